"""The DVC remote: the committed default (a directory next to the checkout) round-trips the tiny pipeline's
outputs through real `dvc push` / `git clone` / `dvc pull`, and `reflow remote` writes DVC's config for S3
through DVC's own API (checked by DVC itself, no network) or refuses clearly without the plugin."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if check:
        assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def reflow_remote(cwd: Path, *args: str, block_plugin: bool = False) -> subprocess.CompletedProcess:
    """`reflow remote ...` as a user runs it (`python -m flows.cli remote ...`), in a fresh interpreter.

    block_plugin: make `import dvc_s3` fail in that interpreter, exactly as on an install without it.
    """
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        if {block_plugin!r}:
            sys.modules["dvc_s3"] = None
        from flows.cli import main
        sys.exit(main(["remote", *{list(args)!r}]))
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by relative path."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)) if p != path else ".": hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def cached_outs(repo: Path) -> list[str]:
    """Stage outputs in DVC's cache: those of dvc.lock that git does not hold (metrics are `cache: false`)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    in_git = set(run(["git", "ls-files"], repo).stdout.split())
    return sorted({o["path"] for s in lock["stages"].values() for o in s.get("outs", [])} - in_git)


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, copy_pipeline):
    """The reproduced tiny pipeline with the committed .dvc/config, its results committed to git, pushed."""
    work = tmp_path_factory.mktemp("remote")
    repo = copy_pipeline(work / "repo")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    gitignores = [str(p.relative_to(repo)) for p in repo.rglob(".gitignore") if ".dvc" not in p.parts]
    run([*GIT, "add", "dvc.lock", "metrics", ".dvc/config", *gitignores], repo)
    run([*GIT, "commit", "-qm", "results"], repo)
    res = run([*DVC, "push"], repo)
    return work, repo, res.stdout


def test_committed_default_is_a_directory_next_to_the_checkout():
    from dvc.config import Config

    raw = (ROOT / ".dvc" / "config").read_text()
    assert "remote = local" in raw and "url = ../../reflow-dvc-remote" in raw
    conf = Config(dvc_dir=str(ROOT / ".dvc")).read("repo")  # the committed level only, paths resolved
    assert conf["core"]["remote"] == "local"
    url = Path(conf["remote"]["local"]["url"])
    assert url == ROOT.parent / "reflow-dvc-remote"
    assert not url.is_relative_to(ROOT)  # outside everything git and DVC track in the checkout


def test_push_fills_the_default_remote(pushed):
    work, repo, out = pushed
    remote = work / "reflow-dvc-remote"
    assert remote.is_dir() and any(remote.rglob("*"))
    assert "pushed" in out
    # DVC's own comparison of cache and remote: everything the workspace has is there.
    status = run([*DVC, "status", "--cloud"], repo).stdout
    assert "Cache and remote 'local' are in sync" in status, status
    # The remote is next to the checkout, not in it: git sees nothing of it.
    assert run([*GIT, "status", "--porcelain", "--untracked-files=all"], repo).stdout.count("reflow-dvc-remote") == 0


def test_fresh_clone_pulls_every_output_bit_for_bit(pushed):
    from storage.datasets import open_dataset

    work, repo, _ = pushed
    clone = work / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], work)
    outs = cached_outs(clone)
    assert "artifacts/prepare" in outs and len(outs) >= 10
    assert not any((clone / o).exists() for o in outs)
    # No setup: the clone's committed .dvc/config names the same directory (it sits next to both).
    run([*DVC, "pull", "dvc.yaml"], clone)  # the class pipeline: text/dvc.yaml never ran here
    for out in outs:
        assert tree_digest(clone / out) == tree_digest(repo / out), out
    status = run([*DVC, "status", "dvc.yaml"], clone).stdout
    assert "Data and pipelines are up to date" in status, status
    train = open_dataset(clone / "artifacts/prepare/train.zarr", kind="images", verify=True)
    assert train.attrs["content_hash"] == open_dataset(repo / "artifacts/prepare/train.zarr").attrs["content_hash"]


@pytest.fixture
def dvc_repo(tmp_path):
    """A bare DVC project with the committed .dvc/config (what `reflow remote` edits)."""
    repo = tmp_path / "proj"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run([*DVC, "init", "-q"], repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    return repo


def test_reflow_remote_s3_sets_the_default_through_dvc(dvc_repo):
    pytest.importorskip("dvc_s3")
    res = reflow_remote(dvc_repo, "s3://bucket/reflow", "--endpoint-url", "http://127.0.0.1:9000",
                        "--region", "eu-west-1")
    assert res.returncode == 0, res.stderr
    assert "'s3' = s3://bucket/reflow is now the default" in res.stdout
    assert "* s3" in res.stdout and "endpointurl=http://127.0.0.1:9000" in res.stdout
    # DVC's own CLI reads it back...
    assert run([*DVC, "remote", "default"], dvc_repo).stdout.strip() == "s3"
    assert run([*DVC, "config", "remote.s3.endpointurl"], dvc_repo).stdout.strip() == "http://127.0.0.1:9000"
    assert run([*DVC, "config", "remote.s3.region"], dvc_repo).stdout.strip() == "eu-west-1"
    listed = run([*DVC, "remote", "list"], dvc_repo).stdout
    assert "local" in listed and "s3://bucket/reflow" in listed
    # ...and builds the S3 filesystem `dvc push` would use (no request is made to build it).
    from dvc.repo import Repo

    with Repo(str(dvc_repo)) as dvc:
        remote = dvc.cloud.get_remote()
        assert remote.name == "s3" and remote.fs.protocol == "s3" and remote.path == "bucket/reflow"
        assert remote.fs.fs_args["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    # Back to the directory default, in one command.
    res = reflow_remote(dvc_repo, "--use", "local")
    assert res.returncode == 0, res.stderr
    assert run([*DVC, "remote", "default"], dvc_repo).stdout.strip() == "local"


def test_reflow_remote_local_flag_writes_only_config_local(dvc_repo):
    pytest.importorskip("dvc_s3")
    committed = (dvc_repo / ".dvc" / "config").read_bytes()
    res = reflow_remote(dvc_repo, "s3://bucket/mine", "--local", "--name", "mine")
    assert res.returncode == 0, res.stderr
    assert (dvc_repo / ".dvc" / "config").read_bytes() == committed
    assert "s3://bucket/mine" in (dvc_repo / ".dvc" / "config.local").read_text()
    assert run([*DVC, "remote", "default"], dvc_repo).stdout.strip() == "mine"
    assert "this machine only" in res.stdout


def test_reflow_remote_refuses_s3_without_the_plugin(dvc_repo):
    before = (dvc_repo / ".dvc" / "config").read_bytes()
    res = reflow_remote(dvc_repo, "s3://bucket/reflow", block_plugin=True)
    assert res.returncode == 2
    assert "cannot use 's3://bucket/reflow' as a DVC remote" in res.stderr
    assert "requires 'dvc-s3' to be installed" in res.stderr
    assert "pip install 'reflow[s3]'" in res.stderr and "pip install dvc-s3" in res.stderr
    assert (dvc_repo / ".dvc" / "config").read_bytes() == before  # nothing half-configured
    assert not (dvc_repo / ".dvc" / "config.local").exists()


def test_reflow_remote_bad_input_is_refused_clearly(dvc_repo):
    before = (dvc_repo / ".dvc" / "config").read_bytes()
    res = reflow_remote(dvc_repo, "--use", "nosuch")
    assert res.returncode == 2 and "no remote named 'nosuch'; the remotes are ['local']" in res.stderr
    res = reflow_remote(dvc_repo, "nosuch://bucket/x")
    assert res.returncode == 2 and "Unsupported URL type nosuch://" in res.stderr
    res = reflow_remote(dvc_repo, str(dvc_repo.parent / "elsewhere"), "--endpoint-url", "http://x")
    assert res.returncode == 2 and "apply to s3:// remotes only" in res.stderr
    res = reflow_remote(dvc_repo, "--region", "eu-west-1")
    assert res.returncode == 2 and "need a URL" in res.stderr
    assert (dvc_repo / ".dvc" / "config").read_bytes() == before


def test_reflow_remote_directory_replaces_the_local_default(dvc_repo, tmp_path):
    shared = tmp_path / "nfs" / "reflow-remote"
    res = reflow_remote(dvc_repo, str(shared))
    assert res.returncode == 0, res.stderr
    assert run([*DVC, "remote", "default"], dvc_repo).stdout.strip() == "local"
    assert f"url = {shared}" in (dvc_repo / ".dvc" / "config").read_text()  # absolute stays absolute
    assert f"* local  {shared}  [.dvc/config]" in reflow_remote(dvc_repo).stdout
    # A relative directory is taken from where the command runs and stored relative to .dvc/, as DVC does.
    res = reflow_remote(dvc_repo, "../nfs/reflow-remote")
    assert res.returncode == 0, res.stderr
    assert "url = ../../nfs/reflow-remote" in (dvc_repo / ".dvc" / "config").read_text()
    assert f"* local  {shared}  [.dvc/config]" in reflow_remote(dvc_repo).stdout
