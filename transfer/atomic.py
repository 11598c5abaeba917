"""Atomic writes (a file or a directory either appears whole at its path or not at all), and checked reads.

Everything is built beside the target (same directory, so same filesystem) and renamed into place: a
process killed mid-write leaves the old version (or nothing) plus a hidden temp entry, never half a file.
Files get the normal mode (0666 minus the umask), not the 0600 that `tempfile` uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes, fsync: bool = True) -> Path:
    """Write text (UTF-8) or bytes to `path` via a temp file in the same directory and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """JSON (indented, sorted keys, unknown objects as str) written atomically; a trailing newline."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    return write_atomic(path, text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temp folder next to `path`; on success it replaces `path` (old one removed).

    with atomic_dir(out) as tmp: write files into tmp. On an exception the temp folder is removed and
    `path` is untouched. The swap is two renames (old aside, new in): a kill between them leaves the
    old version in a hidden `.<name>.old-*` folder beside `path`, never a mixed directory.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_json(path: str | os.PathLike, what: str = "json", expect: type | None = None) -> Any:
    """A JSON file's content. A missing file, invalid JSON or (with `expect`) another top-level type is one
    error line naming the file and `what` it should have been."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid {what}, not valid JSON ({err})") from None
    if expect is not None and not isinstance(data, expect):
        shape = {dict: "object", list: "list"}.get(expect, expect.__name__)
        raise ValueError(f"{path}: invalid {what}, expected a JSON {shape}, got {type(data).__name__}")
    return data
