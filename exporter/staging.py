"""Atomic export directories: write everything into a staging directory, publish at the end.

An export that fails half-way (a full disk, an exception in ``save_pretrained``) must leave no
``out`` directory that looks like a complete export, and must not half-overwrite an existing
one. `staged_dir` yields a fresh temporary directory beside ``out`` (same file system, so moves
are renames); on success its files are moved into ``out``, on any error it is removed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from wara_train.errors import ConfigError


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, *, stale: Sequence[str] = (), last: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a staging directory for an export to ``out``; publish it when the block succeeds.

    Publishing: a missing ``out`` is the staging directory renamed (atomic). An existing ``out``
    gets each staged file moved in (each move atomic; the names in ``last`` after the others, so
    the marker a reader looks for is replaced once the rest is in place); then its files that
    match a glob of ``stale`` but were not written this time are removed (a task head left from
    an earlier export would change what the new one means). Other files in ``out`` are kept."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would otherwise become out's mode
    try:
        yield tmp
        _publish(tmp, out, stale=stale, last=last)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed to out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, out: Path, *, stale: Sequence[str], last: Sequence[str]) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    staged = sorted(tmp.iterdir(), key=lambda p: p.name in last)
    for p in staged:  # refuse before moving anything
        if (out / p.name).is_dir() != p.is_dir() and (out / p.name).exists():
            raise ConfigError(f"{out / p.name}: the export writes a {'directory' if p.is_dir() else 'file'} there")
    written = {p.name for p in staged}
    for p in staged:
        if p.is_dir():
            shutil.rmtree(out / p.name, ignore_errors=True)
        os.replace(p, out / p.name)
    for old in out.iterdir():
        if old.is_file() and old.name not in written and any(fnmatch.fnmatch(old.name, g) for g in stale):
            old.unlink()
