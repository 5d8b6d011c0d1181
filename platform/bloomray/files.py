"""Atomic writes: every file and directory bloomray produces appears whole or not at all.

Used by every writer (export, quantized and dense copies, the tune winner, summary.json,
config.yaml, trials.csv, the checkpoint index, API key files). A reader (a server, a watcher,
a resumed run) never sees half a file, and a crash or a bad input leaves the previous version.
This module is at the bottom of the package: it imports nothing from bloomray.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _default_mode() -> int:
    """A new file's mode under this process's umask (read once: ``os.umask`` can only be read by
    setting it, which is process-wide and would race with threads creating files)."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


_DEFAULT_MODE = _default_mode()


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same dir and ``os.replace``.

    Args:
        mode: file permissions; default: the umask's (0600 files are private from creation,
            since ``mkstemp`` creates them so).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _DEFAULT_MODE if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield a hidden temp dir next to ``out``; fill it, and on success it becomes ``out``.

    On any error the temp dir is removed and ``out`` is left as it was.

    Args:
        replace: an existing ``out`` is replaced (moved aside, then removed); with False an
            ``out`` that appeared meanwhile raises FileExistsError and is left alone.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal dir
        yield tmp
        if replace:
            swap_into_place(tmp, out)
        elif out.exists():
            raise FileExistsError(f"{out} was created meanwhile; remove it or choose another path")
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hash_dir(path: Path) -> str:
    """sha256 over the files of a directory (names and contents, sorted)."""
    h = hashlib.sha256()
    for p in sorted(x for x in path.iterdir() if x.is_file()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()
