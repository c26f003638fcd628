"""Files that survive a crash at any moment: atomic replace and fsync'd appends."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# fsyncs waited for together: the disk commits them in one go (a journaling file system
# joins concurrent fsyncs into one commit), where one after another costs one commit each
_SYNCS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fedmq-fsync")
# a commit that runs while its caller goes on (fsync_all_later): one at a time, in order
_LATER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmq-commit")
# files no longer needed, deleted off the caller's thread (remove_tree_later)
_CLEANUP = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmq-cleanup")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_dirs(paths) -> list[int]:
    """Descriptors of these directories, to fsync the entries made in them."""
    return [os.open(d, os.O_RDONLY) for d in paths]


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it. A torn last line (crash mid-write) is ignored on read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def fsync_all(fds: list[int]) -> None:
    """fsync every descriptor, concurrently; raises the first OSError."""
    if len(fds) == 1:
        os.fsync(fds[0])
    elif fds:
        list(_SYNCS.map(os.fsync, fds))


def fsync_all_later(fds: list[int]) -> Future:
    """``fsync_all(fds)`` in the background: the returned future is done when every byte
    written to ``fds`` before this call is on disk (its ``result()`` raises the OSError)."""
    return _LATER.submit(fsync_all, list(fds))


def remove_tree_later(path: Path) -> Future:
    """``shutil.rmtree(path)`` (errors ignored) in the background; done when it is gone."""
    return _CLEANUP.submit(shutil.rmtree, path, ignore_errors=True)


def write_together(
    replace: dict[Path, bytes], append: dict[Path, str], then: dict[Path, bytes] | None = None
) -> None:
    """Replace files atomically and append lines to others, with one concurrent wait for
    the disk: every file's data durable, then the renames, then each directory durable.
    A crash leaves each replaced file old or new and each appended file with its new line
    whole, or torn (cut on read) or absent; the caller orders what depends on this.

    ``then``: files replaced only once all of that is durable (a commit record that makes
    the rest count); their data is written and synced in the same wait as the others'."""
    then = then or {}
    handles = []
    try:
        for path, data in {**replace, **then}.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(_tmp(path), "wb")  # noqa: SIM115
            handles.append(fh)
            fh.write(data)
        for path, line in append.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a", encoding="utf-8")  # noqa: SIM115
            handles.append(fh)
            fh.write(line.rstrip("\n") + "\n")
        for fh in handles:
            fh.flush()
        fsync_all([fh.fileno() for fh in handles])
    finally:
        for fh in handles:
            fh.close()
    for group in (replace, then):
        for path in group:
            os.replace(_tmp(path), path)
        fds = open_dirs({path.parent for path in group})
        try:
            fsync_all(fds)
        finally:
            close_all(fds)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def repair_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-append) so the next append starts a fresh line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    if data and not data.endswith(b"\n"):
        atomic_write(path, data[: data.rfind(b"\n") + 1])


def read_lines(path: Path) -> list[str]:
    """Complete lines only: a last line without its newline was torn by a crash."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [line for line in lines[:-1] if line.strip()]
