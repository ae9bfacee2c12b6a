"""Where a dataset lives: a local path, or an fsspec URL and the filesystem behind it.

:func:`storage.datasets.write_dataset` and :func:`storage.datasets.open_dataset` take a local path or an
fsspec URL (``memory://``, ``file://``, ``s3://bucket/key.zarr``, ``gs://``, chained ones like
``simplecache::s3://``), with the same layout, checks and content hash everywhere. ``file://`` URLs are
local paths and keep the atomic rename; elsewhere (object stores have no rename) the group's ``zarr.json``
carrying ``content_hash`` is written last, in one PUT, so an interrupted write reads as unfinished, never as
a finished dataset. A URL without its fsspec backend installed is an error saying what to install.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr
from zarr.storage import FsspecStore, LocalStore

from storage.layout import _err

# `proto://...` or a chained `proto::proto://...` URL; a bare path (or a Path object) is local.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)")
_LOCAL_PROTOCOLS = {"file", "local"}  # fsspec's names for the local filesystem
# Where a protocol's fsspec backend comes from, when it is one this project declares.
_BACKEND_INSTALL = {"s3": "pip install 'reflow[s3]' (or: pip install s3fs)", "s3a": "pip install 'reflow[s3]'"}


@dataclass(frozen=True)
class _Remote:
    """A dataset behind an fsspec URL: the URL as given (for messages), a sync filesystem for listing and
    the path inside it, and the options to open zarr's FsspecStore with."""

    url: str
    fs: Any
    root: str
    storage_options: Mapping[str, Any]

    def store(self, read_only: bool) -> FsspecStore:
        return FsspecStore.from_url(self.url, storage_options=dict(self.storage_options) or None,
                                    read_only=read_only)

    def keys(self) -> set[str]:
        """Every object under the dataset, relative to it (one listing instead of one request per shard)."""
        prefix = self.root.rstrip("/") + "/"
        try:
            found = self.fs.find(self.root)
        except Exception as e:  # network, credentials, permissions: the backends raise many types
            raise _err(self.url, f"cannot list it ({type(e).__name__}: {e}); check the URL, the network "
                                 "and the credentials for this storage") from e
        return {posixpath.relpath(f, prefix) for f in found if f.startswith(prefix)}


def _location(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> Path | _Remote:
    """A local Path (plain paths and file:// URLs, which keep atomic renames) or a :class:`_Remote`."""
    if isinstance(path, Path) or not _URL_RE.match(str(path)):
        if storage_options:
            raise _err(path, f"storage_options {sorted(storage_options)} given for a local path; "
                             "expected them only with an fsspec URL")
        return Path(path)
    url = str(path)
    protocol = re.split(r"://|::", url, maxsplit=1)[0].lower()
    if protocol in _LOCAL_PROTOCOLS and "::" not in url.split("://", 1)[0]:
        from fsspec.implementations.local import LocalFileSystem

        return Path(LocalFileSystem._strip_protocol(url))
    import fsspec.core

    try:
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as e:  # fsspec's message names the package ("Install s3fs to access S3")
        how = _BACKEND_INSTALL.get(protocol, "install the fsspec backend package for it")
        raise _err(url, f"no fsspec backend for {protocol}:// here ({e}); {how}") from e
    except ValueError as e:
        raise _err(url, f"not a usable URL ({e}); expected a local path or an fsspec URL such as "
                        "memory://, file:// or s3://bucket/key.zarr") from e
    except Exception as e:  # a backend that connects while being built (bad endpoint, credentials)
        raise _err(url, f"cannot reach it ({type(e).__name__}: {e}); check the URL, the network and "
                        "the credentials for this storage") from e
    return _Remote(url=url, fs=fs, root=str(root), storage_options=dict(storage_options or {}))


def _open_store_group(path: Path | _Remote, mode: str) -> zarr.Group:
    where = path.url if isinstance(path, _Remote) else path
    try:
        store = path.store(mode == "r") if isinstance(path, _Remote) else LocalStore(path, read_only=(mode == "r"))
        return zarr.open_group(store=store, mode=mode, zarr_format=3)  # type: ignore[arg-type]
    except Exception as e:
        raise _err(where, f"not a zarr v3 group ({type(e).__name__}: {e}); expected a dataset directory") from e

