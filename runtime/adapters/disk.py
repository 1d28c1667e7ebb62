"""The disk tier: the adapter root, its index and its one reader.

Start-up reads each adapter directory's ``adapter_config.json`` and the first 8 bytes of its
``adapter_model.safetensors`` (the header's length, checked against the file's size); no
tensor is read until a request needs the adapter, when the full checks of a load run
(`runtime.adapters.repository.Repository.load`). So a root of 10,000 adapters is indexed in about a second and
the server is ready before any adapter's tensors are read. An entry records what the index
shows (rank, pages, bytes on disk) and, for a directory that is plainly broken, why; a request
for it still goes through the load, which gives the full error.

A name is served only as what it resolves to: a directory symlinked to another directory of the
root is that other adapter (its *owner*), and a caller must be allowed both names
(`owner_of`), so a symlink cannot hand one tenant another tenant's weights.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from wara_train.artifact import (CONFIG_NAME, MAX_CONFIG_BYTES, MAX_HEADER_BYTES, WEIGHTS_NAME, path_inside,
                                 read_artifact_files)
from wara_train.wavelets import blocks

from ..errors import ModelNotFound

log = logging.getLogger("wara.serve")


@dataclass(frozen=True)
class Entry:
    """One adapter directory under the root, as indexed."""

    name: str
    base_model: str = ""
    rank: int = 0
    levels: int = 0
    file_bytes: int = 0  # adapter_model.safetensors on disk
    problem: str | None = None  # why it cannot be served, as far as the index can tell

    @property
    def pages(self) -> int:
        """Its folded rank: rank x its number of blocks (what a folded slot takes)."""
        return self.rank * len(blocks(self.levels))


def index_dir(root: Path, path: Path) -> Entry | None:
    """The entry of one directory, or None when it holds no adapter config (not an adapter)."""
    name = path.name
    config = path / CONFIG_NAME
    try:
        with open(config, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as e:
        return Entry(name, problem=f"{CONFIG_NAME} could not be read ({e.strerror or type(e).__name__})")
    if not path_inside(root, path):  # a directory symlinked out of the root is not the root's
        log.warning("skipping adapter %s: it resolves outside the adapter root (a symlink?)", name)
        return None
    if not path_inside(root, config):
        return Entry(name, problem=f"{CONFIG_NAME} resolves outside the adapter root (a symlink?)")
    if len(raw) > MAX_CONFIG_BYTES:
        return Entry(name, problem=f"{CONFIG_NAME} is over {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(raw)
        base, rank, levels = str(cfg["base_model"]), cfg["rank"], cfg["levels"]
        if not (isinstance(rank, int) and isinstance(levels, int) and rank > 0 and levels > 0):
            raise ValueError("rank and levels must be positive integers")
    except (ValueError, KeyError, TypeError) as e:
        return Entry(name, problem=f"{CONFIG_NAME} is not a valid adapter config ({type(e).__name__}: {e})"[:300])
    weights = path / WEIGHTS_NAME
    try:
        with open(weights, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
    except OSError:
        return Entry(name, base, rank, levels, problem=f"missing or unreadable {WEIGHTS_NAME}")
    if not path_inside(root, weights):
        return Entry(name, base, rank, levels, problem=f"{WEIGHTS_NAME} resolves outside the adapter root")
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 0 or n > MAX_HEADER_BYTES or 8 + n > size:
        return Entry(name, base, rank, levels, size, problem=f"{WEIGHTS_NAME} has no valid safetensors header")
    return Entry(name, base, rank, levels, size)


class Catalog:
    """Every adapter directory under the root by name; thread-safe. A name not indexed yet is
    looked up on disk when asked for (an adapter copied into the root while serving)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.entries: dict[str, Entry] = {}
        self.lock = threading.Lock()
        self.seconds = 0.0

    def scan(self) -> "Catalog":
        t0 = time.perf_counter()
        found = {}
        with os.scandir(self.root) as it:
            for d in it:
                if d.is_dir():
                    entry = index_dir(self.root, Path(d.path))
                    if entry is not None:
                        found[entry.name] = entry
        with self.lock:
            self.entries = dict(sorted(found.items()))
        self.seconds = time.perf_counter() - t0
        bad = sum(1 for e in found.values() if e.problem)
        log.info("indexed %d adapters under the adapter root in %.2f s%s", len(found), self.seconds,
                 f" ({bad} with problems)" if bad else "")
        return self

    def get(self, name: str) -> Entry | None:
        with self.lock:
            entry = self.entries.get(name)
        if entry is not None:
            return entry
        path = self.root / name
        if not path.is_dir():
            return None
        entry = index_dir(self.root, path)
        if entry is not None:
            with self.lock:
                self.entries[name] = entry
        return entry

    def forget(self, name: str) -> None:
        """A directory that turned out to be gone (a load found nothing)."""
        with self.lock:
            self.entries.pop(name, None)

    def names(self) -> list[str]:
        with self.lock:
            return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def owner_of(root: Path, name: str) -> str | None:
    """The name of the root's directory that ``root/name`` resolves to (``name`` itself unless
    it is a symlink to a sibling), or None when it resolves to anything else (outside the
    root, or deeper inside it)."""
    root = Path(root).resolve()
    try:
        rel = (root / name).resolve().relative_to(root)
    except (ValueError, OSError):
        return None
    return rel.parts[0] if len(rel.parts) == 1 else None


def read_dir(root: Path, name: str) -> dict[str, bytes]:
    """The files of adapter ``name`` under the adapter root; NOT_FOUND if there is none. The
    directory and both files must resolve inside the root (a symlink out of it is refused).
    Errors name the adapter, never the server's paths."""
    path = Path(root) / name
    if not path.is_dir():
        raise ModelNotFound(f"no adapter directory {name!r} under the adapter root")
    return read_artifact_files(path, source=f"adapter {name!r}", root=root)


def stamp(root: Path, name: str) -> tuple | None:
    """(size, mtime) of an adapter's two files, or None when either is gone: what `unchanged`
    compares to tell, without reading them, whether the files are still those loaded."""
    out = []
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            st = os.stat(Path(root) / name / f)
        except OSError:
            return None
        out.append((st.st_size, st.st_mtime_ns))
    return tuple(out)
