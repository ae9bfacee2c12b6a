"""`reflow remote`: where `dvc push` / `dvc pull` keep the artifacts, shown or changed in one command.

The committed `.dvc/config` names a default remote `local`: the directory `reflow-dvc-remote` next to the
checkout, so push and pull work on a fresh clone with no setup. `reflow remote s3://bucket/prefix` makes
S3 (or any other storage DVC supports) the default instead. Everything is read and written through DVC's
own config API, with DVC's validation, so `dvc remote list` and `dvc push` see exactly what this wrote.
Credentials are never written: DVC's S3 plugin takes them from the usual AWS sources (environment,
`~/.aws`, `--profile`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEFAULT_NAME = "local"  # the committed default remote: a directory next to the checkout
# Remote options safe to print; everything else (keys, passwords, tokens) is left out of the listing.
SHOWN_OPTIONS = ("endpointurl", "region", "profile")
# Option flags of `reflow remote URL`: (flag, DVC's s3 option).
S3_FLAGS = (("endpoint_url", "endpointurl"), ("region", "region"), ("profile", "profile"))
LEVEL_FILES = {"repo": ".dvc/config", "local": ".dvc/config.local (this machine only, not committed)",
               "global": "DVC's global config", "system": "DVC's system config"}


class RemoteError(RuntimeError):
    """A remote that cannot be configured or used; the message says what to do."""


def _scheme(url: str) -> str:
    from urllib.parse import urlparse

    scheme = urlparse(url).scheme
    # A Windows drive letter parses as a one-letter scheme: it is a local path.
    return "" if len(scheme) <= 1 else scheme.lower()


def install_hint(url: str) -> str | None:
    """None when DVC can use `url` as a remote here, else what is missing and exactly how to install it."""
    from dvc.fs import get_fs_cls

    scheme = _scheme(url)
    try:
        get_fs_cls({"url": url})
    except ImportError as exc:
        if scheme == "s3":
            how = ("pip install 'reflow[s3]'  (from the checkout: pip install -e '.[s3]'; "
                   "or just DVC's plugin: pip install dvc-s3)")
        else:
            plugin = str(exc).rsplit("'", 2)[-2] if str(exc).count("'") >= 2 else f"dvc-{scheme}"
            how = f"pip install {plugin}"
        return f"{exc}. Install it into this environment with:\n  {how}"
    return None


def _config(root: Path):
    from dvc.config import Config

    dvc_dir = root / ".dvc"
    if not dvc_dir.is_dir():
        raise RemoteError(f"{root}: no .dvc directory; expected a DVC project (run `dvc init` first)")
    return Config(dvc_dir=str(dvc_dir))


def remotes(root: Path) -> dict[str, Any]:
    """The remotes DVC sees in `root` (all config levels merged), which one is the default, where each
    is defined, and whether its plugin is installed."""
    config = _config(root)
    merged = config.read()
    defined: dict[str, str] = {}
    default_level = None
    for level in config.LEVELS:  # in shadowing order: the last level naming a remote wins
        conf = config.read(level)
        for name in conf.get("remote", {}):
            defined[name] = level
        if conf.get("core", {}).get("remote"):
            default_level = level
    default = merged.get("core", {}).get("remote")
    listed = []
    for name, section in sorted(merged.get("remote", {}).items()):
        url = str(section["url"])
        listed.append({"name": name, "url": url, "default": name == default, "defined_in": defined.get(name),
                       "options": {k: section[k] for k in SHOWN_OPTIONS if k in section},
                       "missing": install_hint(url)})
    return {"default": default, "default_set_in": default_level, "remotes": listed}


def set_remote(root: Path, url: str, *, name: str | None = None, options: dict[str, str] | None = None,
               level: str = "repo") -> str:
    """Add (or replace) remote `name` at `url` with `options` and make it the default at `level`
    ("repo": the committed .dvc/config, "local": .dvc/config.local). Returns the remote's name.

    Refuses, changing nothing, when DVC has no plugin for the URL here: a default remote that
    `dvc push` cannot use would only fail later, further from the cause.
    """
    from dvc.config import ConfigError

    scheme = _scheme(url)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if options and scheme != "s3":
        raise RemoteError(f"options {sorted(options)} apply to s3:// remotes only; {url!r} is not one")
    missing = install_hint(url)
    if missing:
        raise RemoteError(f"cannot use {url!r} as a DVC remote: {missing}")
    name = (name or scheme or DEFAULT_NAME).lower()
    config = _config(root)
    try:
        with config.edit(level) as conf:
            conf["remote"][name] = {"url": url, **options}
            conf["core"]["remote"] = name
    except ConfigError as exc:  # DVC's schema: an unsupported URL type, a bad option value
        raise RemoteError(f"DVC refused remote {name!r} = {url!r}: {exc}") from None
    return name


def use_remote(root: Path, name: str, level: str = "repo") -> None:
    """Make the existing remote `name` the default at `level`."""
    config = _config(root)
    known = sorted(config.read().get("remote", {}))
    if name not in known:
        raise RemoteError(f"no remote named {name!r}; the remotes are {known}")
    with config.edit(level) as conf:
        conf["core"]["remote"] = name


def _print(report: dict[str, Any], root: Path) -> None:
    if not report["remotes"]:
        print("No DVC remote configured. `reflow remote DIR_OR_URL` adds one and makes it the default.")
        return
    print(f"DVC remotes of {root} (* = default, used by `dvc push` / `dvc pull`):")
    width = max(len(r["name"]) for r in report["remotes"])
    for r in report["remotes"]:
        opts = "".join(f"  {k}={v}" for k, v in r["options"].items())
        where = LEVEL_FILES.get(r["defined_in"] or "", r["defined_in"])
        print(f"  {'*' if r['default'] else ' '} {r['name']:<{width}}  {r['url']}{opts}  [{where}]")
        if r["missing"]:
            print(f"      not usable here: {r['missing']}".replace("\n", "\n      "))
    if report["default"] is None:
        print("No default remote: name one with `reflow remote --use NAME`.")
    elif report["default"] not in {r["name"] for r in report["remotes"]}:
        print(f"The default {report['default']!r} names no remote: fix it with `reflow remote --use NAME`.")
    elif report["default_set_in"] == "local":
        print("The default is set in .dvc/config.local: it holds for this machine only.")


def cmd_remote(args: argparse.Namespace) -> int:
    from storage.repo import find_repo_root

    level = "local" if args.local else "repo"
    try:
        root = find_repo_root()
        if args.url and args.use:
            raise RemoteError("give a URL to add or --use NAME to switch, not both")
        if args.url:
            options = {dvc_key: getattr(args, flag) for flag, dvc_key in S3_FLAGS}
            name = set_remote(root, args.url, name=args.name, options=options, level=level)
            print(f"DVC remote {name!r} = {args.url} is now the default "
                  f"({'.dvc/config.local' if args.local else '.dvc/config'}).")
            if not args.local:
                print("Commit .dvc/config to share it. Credentials come from the usual places for the "
                      "storage (for S3: AWS_* variables, ~/.aws, --profile), never from this file.")
        elif args.use:
            use_remote(root, args.use, level)
        elif args.name or any(getattr(args, flag) for flag, _ in S3_FLAGS):
            raise RemoteError("--name, --endpoint-url, --region and --profile need a URL to add")
        _print(remotes(root), root)
    except (RemoteError, FileNotFoundError) as exc:
        print(f"reflow remote: {exc}", file=sys.stderr)
        return 2
    return 0


def add_commands(subparsers) -> None:
    """Register `remote` on the `reflow` command's subparsers."""
    p = subparsers.add_parser(
        "remote", help="show the DVC remotes, or make a directory or s3://bucket/prefix the default",
        description="Without arguments: the DVC remotes and which is the default. With a URL or directory: "
                    "add it as a remote (named after its scheme, or `local` for a directory) and make it "
                    "the default for `dvc push` / `dvc pull`.")
    p.add_argument("url", nargs="?", help="s3://bucket/prefix, another DVC-supported URL, or a directory")
    p.add_argument("--name", help="remote name (default: the URL scheme, e.g. s3; `local` for a directory)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2, ...): DVC's endpointurl")
    p.add_argument("--region", help="S3 region")
    p.add_argument("--profile", help="AWS credentials profile (from ~/.aws) to use for this remote")
    p.add_argument("--use", metavar="NAME", help="make the existing remote NAME the default")
    p.add_argument("--local", action="store_true",
                   help="write .dvc/config.local (this machine only) instead of the committed .dvc/config")
    p.set_defaults(func=cmd_remote)
