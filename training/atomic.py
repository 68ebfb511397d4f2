"""Atomic file writes: a file is visible under its real name only once it is whole.

Every stage (shards, manifests, token shards, checkpoints) writes through here so that
an interruption at any point (SIGKILL, a full disk) leaves either the old file or the new
one, never a torn one. Temporary files carry a ``.tmp-`` prefix so readers and cleanup
can recognise and ignore them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

TMP_PREFIX = ".tmp-"


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry so a rename survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` on success.

    On any exception (including KeyboardInterrupt and OSError for a full disk) the temporary
    file is removed and ``final`` is left exactly as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that becomes ``final`` when the block exits cleanly."""
    with atomic_path(final) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(final, "wb") as fh:
        fh.write(data)


def atomic_write_text(final: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON with sorted keys and a trailing newline, atomically."""
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> int:
    """Delete temporaries (files, and folders of a sharded checkpoint) left by a killed writer; returns how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.glob(TMP_PREFIX + "*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    return removed


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_dir(source: Path, target: Path) -> None:
    """Put the folder ``source`` at ``target``, replacing a folder there, so that a reader finds the
    old one or the new one whole (``os.replace`` cannot replace a non-empty folder).

    An existing ``target`` is exchanged with ``source`` in one step where the kernel and file system
    allow it; elsewhere it is first renamed aside to a temporary, which leaves an instant without
    ``target`` (a kill there loses that tag, never leaves a torn one)."""
    if not target.exists():
        os.replace(source, target)
    elif _exchange(source, target):
        shutil.rmtree(source)
    else:
        aside = target.with_name(f"{TMP_PREFIX}{target.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
        os.replace(source, target)
        shutil.rmtree(aside)
    fsync_dir(target.parent)


def read_versioned_json(path: Path, version: int, missing: str, error: type[Exception]) -> dict[str, Any]:
    """Load a JSON object written with a ``version`` key; a missing, unreadable or other-version file
    raises ``error`` with one line naming the file (``missing`` says what its absence means)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise error(f"{path}: unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != version:
        found = data.get("version") if isinstance(data, dict) else None
        raise error(f"{path}: format version {found!r}, expected {version}")
    return data
