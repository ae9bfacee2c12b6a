"""Atomic file and directory writes.

A reader (or a later DVC stage) must never see a half-written file or directory: everything is
written under a temporary name in the same directory (so the final rename stays on one
filesystem), flushed to disk, and then renamed into place. This is the project's one implementation of
that (checkpoints and the sharded dataset writer use its pieces).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from storage.faults import crash_point

__all__ = [
    "atomic_dir",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "temp_sibling",
]


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that renames/creations inside it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """fsync one file that is already written (and closed) so that its data survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (files first, then their directories)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def temp_sibling(final: Path, prefix: str = ".tmp") -> Path:
    """A fresh temporary name next to ``final`` (same directory, so a rename stays on one filesystem)."""
    return final.parent / f"{prefix}-{final.name}-{secrets.token_hex(6)}"


def atomic_write(
    path: str | Path, write: Callable[[BinaryIO], None], *, before_replace: Callable[[Path], None] | None = None
) -> None:
    """Write a file atomically: ``write(f)`` fills a temp file in the same dir, which is fsynced and put in
    place with ``os.replace`` (then the directory is fsynced). ``before_replace(tmp)`` runs on the complete,
    fsynced temp file just before the rename (to checksum it, say). On any failure the temp file is removed
    and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_sibling(path)
    # os.open with 0o666 lets the umask decide the mode, as a plain open() would (mkstemp gives 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomic UTF-8 text write (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write, indented and key-sorted so humans and diffs can read it."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def npz_bytes(arrays: dict[str, Any]) -> bytes:
    """An `.npz` archive (what `numpy.load` reads) whose bytes depend on the arrays only.

    `numpy.savez` stamps each member with the current time, so the same arrays would hash differently on
    every run and DVC would see a changed output; here every member has the same fixed date."""
    import io
    import zipfile

    import numpy as np

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buffer.getvalue()


def atomic_write_npz(path: str | Path, arrays: dict[str, Any]) -> None:
    atomic_write_bytes(path, npz_bytes(arrays))


def _remove_stale(final: Path) -> None:
    """Remove leftovers of earlier, killed attempts at writing ``final``.

    Safe because only one writer per final path runs at a time (DVC locks its outputs); leaving
    them would put junk next to (or inside a directory) output that DVC tracks.
    """
    for prefix in (".tmp", ".old"):
        for stale in final.parent.glob(f"{prefix}-{glob.escape(final.name)}-*"):
            if len(stale.name) == len(prefix) + len(final.name) + 14:  # "-" + name + "-" + 12 hex
                shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temp directory next to ``final``; on success it replaces ``final``.

    On normal exit the tree is fsynced, an existing ``final`` is renamed aside to
    ``.old-<name>-<random>``, the new directory is renamed to ``final`` and the old one removed, so
    ``final`` is always a complete directory (old or new). The only gap is between the two renames:
    a crash there leaves ``final`` absent (never partial) and the complete old copy under its
    ``.old-`` name. On an exception the temp dir is removed and ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final)
    tmp = temp_sibling(final)
    os.mkdir(tmp, 0o777)  # not mkdtemp: its 0700 mode would end up on the final output
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Path | None = None
    if final.exists() or final.is_symlink():
        old = temp_sibling(final, ".old")
        os.rename(final, old)
    crash_point("output_rename")
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
