"""The adapter artifact's two files on disk: their names and size limits, the one bounded
reader of adapter directories (`read_artifact_files`) and the safetensors header check.

Everything here works on bytes and paths, before any tensor exists: a file over its limit, a
header that does not match the file, or a path that resolves outside the adapter root is refused
without reading the rest. `wara_train.artifact` turns the bytes into a validated adapter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 4 << 30
MAX_HEADER_BYTES = 16 << 20  # the JSON header of adapter_model.safetensors
# safetensors dtype -> bytes per element (every dtype the format knows)
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def path_inside(root: Path, path: Path) -> bool:
    """Whether ``path``, every symlink followed, lies inside the resolved ``root``."""
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def check_safetensors_header(head: bytes, total: int, *, source: str) -> dict:
    """Validate the header of a safetensors file of ``total`` bytes, given (at least) its first
    ``8 + header length`` bytes: the header's size is within `MAX_HEADER_BYTES` and the file,
    every tensor's dtype is known and its byte range matches its shape, and the tensors' data
    ends exactly where the file does. Returns the parsed header; raises `AdapterError` naming
    the problem (never a path)."""
    what = f"{source}: {WEIGHTS_NAME} is an unreadable safetensors file:"
    if total < 8 or len(head) < 8:
        raise AdapterError(f"{what} truncated ({total} bytes, shorter than a safetensors header)")
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise AdapterError(f"{what} it declares a {n}-byte header, over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > total:
        raise AdapterError(f"{what} it declares a {n}-byte header but the file has only {total} bytes (truncated?)")
    if len(head) < 8 + n:
        raise AdapterError(f"{what} the header could not be read whole")
    try:
        header = json.loads(bytes(head[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise AdapterError(f"{what} its header is not valid JSON (truncated or corrupt?)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{what} its header is not a JSON object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        shown = key if len(key) <= 100 else key[:100] + "..."
        if not isinstance(info, dict):
            raise AdapterError(f"{what} the header entry of {shown!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in ST_ITEMSIZE:
            raise AdapterError(f"{what} tensor {shown!r} has an unknown dtype {str(dtype)[:20]!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise AdapterError(f"{what} tensor {shown!r} has an invalid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise AdapterError(f"{what} tensor {shown!r} has invalid data_offsets")
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * ST_ITEMSIZE[dtype]:
            raise AdapterError(f"{what} tensor {shown!r} declares shape {tuple(shape)} of {dtype} "
                               f"({count * ST_ITEMSIZE[dtype]} bytes) but a {offsets[1] - offsets[0]}-byte range")
        end = max(end, offsets[1])
    if 8 + n + end != total:
        raise AdapterError(f"{what} its header declares {end} bytes of tensor data, the file holds "
                           f"{total - 8 - n} (truncated or corrupt?)")
    return header


class ArtifactFiles(dict):
    """The files of an artifact as `read_artifact_files` read them: the weights header already
    checked (``header``), so parsing them does not check it twice."""

    header: dict | None = None


def read_artifact_files(path: str | os.PathLike, *, source: str | None = None,
                        root: str | os.PathLike | None = None) -> dict[str, bytes]:
    """The two files of an artifact directory, size-checked (the one reader of adapter
    directories: `load_adapter` and the server's adapter root both use it). Errors start with
    ``source`` (default: the path). With ``root``, the directory and each file must resolve
    (symlinks followed) inside it. The weights file's header is checked against the file's
    size before the rest of it is read, so an oversized or corrupt file is never read whole."""
    path = Path(path)
    label = source or str(path)
    if not path.is_dir():
        raise AdapterError(f"{label}: not an adapter directory")
    root_r = Path(root).resolve() if root is not None else None
    if root_r is not None and not path_inside(root_r, path):
        raise AdapterError(f"{label}: the adapter directory resolves outside the adapter root (a symlink?); refused")
    files = ArtifactFiles()
    for name, limit in ((CONFIG_NAME, MAX_CONFIG_BYTES), (WEIGHTS_NAME, MAX_WEIGHTS_BYTES)):
        f = path / name
        if not f.is_file():
            raise AdapterError(f"{label}: missing {name}")
        if root_r is not None and not path_inside(root_r, f):
            raise AdapterError(f"{label}: {name} resolves outside the adapter root (a symlink?); refused")
        try:
            with open(f, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > limit:
                    raise AdapterError(f"{label}: {name} is {size} bytes, over the {limit}-byte limit")
                if name == WEIGHTS_NAME:
                    head = fh.read(8)
                    if len(head) == 8:
                        n = int.from_bytes(head, "little")
                        if n <= MAX_HEADER_BYTES and 8 + n <= size:
                            head += fh.read(n)
                    files.header = check_safetensors_header(head, size, source=label)
                    data = head + fh.read(size - len(head))
                else:
                    data = fh.read(limit + 1)
        except OSError as e:
            raise AdapterError(f"{label}: {name} could not be read ({e.strerror or type(e).__name__})") from None
        if len(data) != size:
            raise AdapterError(f"{label}: {name} changed size while it was read")
        files[name] = data
    return files
