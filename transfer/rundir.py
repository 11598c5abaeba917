"""Run directories: one policy on one set of examples, with everything needed to trust or resume it.

    config.json        the run key: every option that changes results (compared whenever the run is reused)
    status.json        {"state": "running" | "finished" | "error", "error": ..., "info": {...}, writer pid/host}
    predictions.jsonl  one row per finished example, appended as they finish (a torn last line is dropped)
    metrics.json       the summary; the run is "finished" only with a finite score over n_examples > 0
    log.txt            its progress lines (start, resume, finish, failure), from its first result on
    .lock              held by the one process writing the run (a second writer is refused)

A finished run with the same key is reused as is; a killed run resumes (finished examples are read back
and skipped); a run that failed before its first example leaves nothing behind. A different key is
refused, naming the differing keys, unless `overwrite=True` redoes the run. Error rows (rows with an
`error` field) that carry an `input` stamp (`file_stamp`) are retried once their input file changed.
The key should hold `code_fingerprint()` and `model_id(...)` values, so that code changes and retrained
weights never reuse stale runs and a copied runs/ folder still matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from transfer.atomic import write_atomic, write_json_atomic

__all__ = ["RunDir", "DirLock", "code_fingerprint", "config_diff", "file_stamp", "fingerprint", "model_id", "slug",
           "write_json_atomic"]

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
LOCK_FILE = ".lock"
LOG_FILE = "log.txt"  # progress lines of the run (transfer/log.py), written once it has a result
RUN_FILES = (CONFIG_FILE, STATUS_FILE, PREDICTIONS_FILE, METRICS_FILE, LOG_FILE)
# source folders whose code changes results (the CLI and trainers do not)
CODE_DIRS = ("transfer", "adapters", "tasks", "eval", "envs")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# non-weight files that change what a model computes (geometry, tokenisation, preprocessing, NAMM config)
_MODEL_FILES = ("config.json", "generation_config.json", "namm.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "preprocessor_config.json",
                "processor_config.json", "video_preprocessor_config.json", "chat_template.jinja")
_STALE_EMPTY_LOCK_S = 10.0  # a lock file nobody wrote into for this long belongs to a killed process


def slug(*parts: Any) -> str:
    """A readable directory name from config parts (model paths shortened to their last component)."""
    clean = [re.sub(r"[^A-Za-z0-9.+-]+", "-", Path(str(p)).name if "/" in str(p) else str(p)) for p in parts]
    return "__".join(c.strip("-") for c in clean if c)


# ----------------------------------------------------------------------------------------------------------
# What goes into a run key


_hash_cache: dict[tuple[str, int, int], str] = {}


def _file_digest(file: Path) -> str:
    """sha256 of a file, read in blocks and cached per (path, size, mtime) for this process."""
    st = file.stat()
    key = (str(file.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def fingerprint(path_or_id: str | os.PathLike | None) -> str:
    """Short content hash of a local model/NAMM (weights, config and tokenizer files); hub ids are returned
    as they are. Only file names and contents enter it, so a copied folder keeps its fingerprint."""
    if path_or_id is None:
        return ""
    path = Path(path_or_id)
    if not path.exists():
        return str(path_or_id)
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name in _MODEL_FILES))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + _file_digest(file).encode() + b"\0")
    return digest.hexdigest()[:16]


def model_id(path_or_id: str | os.PathLike | None) -> str | None:
    """A model's identity in a run key: `<folder name>@<fingerprint>` for a local path (portable: not the
    absolute path), the id itself for a hub id, None for None."""
    if path_or_id is None:
        return None
    path = Path(path_or_id)
    if not path.exists():
        return str(path_or_id)
    return f"{path.resolve().name}@{fingerprint(path)}"


def code_fingerprint(root: str | os.PathLike | None = None) -> str:
    """Hash of every *.py under the result-affecting source folders (CODE_DIRS) of the repository.

    Put it in a run key so a run made by other code is never reused as finished. `root`: the repository
    (default: the one this module belongs to).
    """
    base = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for file in sorted((base / folder).rglob("*.py")):
            if "__pycache__" in file.parts:
                continue
            digest.update(file.relative_to(base).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def file_stamp(path: str | os.PathLike) -> dict[str, Any]:
    """What an error row stores about its input file, so that the row is retried once the file changes."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "size": None, "mtime_ns": None}
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stale(row: dict[str, Any]) -> bool:
    """An error row whose input file has changed (or appeared) since the row was written."""
    stamp = row.get("input")
    return "error" in row and isinstance(stamp, dict) and "path" in stamp and file_stamp(stamp["path"]) != stamp


def _plain(data: Any) -> Any:
    """The value as it reads back from JSON (tuples -> lists, paths -> str)."""
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def config_diff(stored: dict[str, Any], wanted: dict[str, Any], limit: int = 6) -> str:
    """One line naming the keys whose values differ: 'batch_size: 1 -> 8; policy.budget: absent -> 0.5'."""
    a, b = _flatten(_plain(stored)), _flatten(_plain(wanted))
    missing = object()
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]

    def show(v: Any) -> str:
        text = "absent" if v is missing else json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{k}: {show(a.get(k, missing))} -> {show(b.get(k, missing))}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# One writer at a time


def _process_start(pid: int) -> str | None:
    """The process's start time (Linux /proc), to tell a live writer from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat: starttime


def _alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    except (OSError, OverflowError, ValueError):
        return False
    started = holder.get("start")
    return started is None or _process_start(pid) in (None, started)


class DirLock:
    """An exclusive lock file in a directory, held by one process; a lock left by a killed process is taken over.

    Re-entrant within one process (two handles on the same run in one process do not block each other).
    """

    def __init__(self, directory: str | os.PathLike, what: str = "run") -> None:
        self.file = Path(directory) / LOCK_FILE
        self.what = what
        self.held = False
        pid = os.getpid()
        self.me = {"pid": pid, "host": socket.gethostname(), "start": _process_start(pid), "since": time.time()}

    def _holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.file.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def acquire(self) -> DirLock:
        if self.held:
            return self
        self.file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written right now, or left empty by a killed process
                    with contextlib.suppress(OSError):
                        if time.time() - self.file.stat().st_mtime > _STALE_EMPTY_LOCK_S:
                            self.file.unlink()
                            continue
                    time.sleep(0.05)
                    continue
                if all(holder.get(k) == self.me[k] for k in ("pid", "host", "start")):
                    self.held = True
                    return self
                if _alive(holder):
                    raise ValueError(
                        f"{self.file.parent} is being written by process {holder.get('pid')} on "
                        f"{holder.get('host')} (another {self.what}); wait for it, or delete {self.file} "
                        "if that process is gone"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.file.unlink()  # a killed writer's lock
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return self
        raise ValueError(f"{self.file.parent}: cannot take the lock {self.file}; delete it if no process uses it")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                with contextlib.suppress(FileNotFoundError):
                    self.file.unlink()
            self.held = False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------------------
# The run directory


def _valid_metrics(metrics: Any, n_rows: int) -> str | None:
    """None if the metrics describe a real result, else why not."""
    if not isinstance(metrics, dict):
        return "metrics are not a dict"
    score = metrics.get("score")
    n = metrics.get("n_examples", n_rows)
    unscored = metrics.get("unscored") is True and score is None  # e.g. a test split without answers
    if not unscored and (not isinstance(score, numbers.Real) or isinstance(score, bool) or not math.isfinite(score)):
        return f"score is {score!r}, not a finite number"
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
        return f"n_examples is {n!r}, not a positive count"
    return None


class RunDir:
    """One run directory. Reading never writes; the first write (or `start()` / `with run:`) takes the lock.

    config: the run key (every option that changes results); info: stored beside it, never compared
    (absolute paths, hosts). overwrite: redo the run whatever it holds. writer: False for processes that
    only read (the non-main processes under accelerate): they never lock or write.
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any], *, overwrite: bool = False,
                 writer: bool = True, info: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.config = _plain(config)
        self.info = _plain(info or {})
        self.overwrite = overwrite
        self.writer = writer
        self.lock = DirLock(self.path)
        self._started = False
        if not overwrite:
            self._check_config()

    # -- reading ---------------------------------------------------------------------------------------

    def _read_json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.path / name}: unreadable ({e}); pass --overwrite to redo the run") from None

    def _check_config(self) -> None:
        stored = self._read_json(CONFIG_FILE)
        if stored is None or stored == self.config or not self._holds_results():
            return  # new, the same, or an empty run (failed before its first example): replaced on start
        state = "finished" if self.state() == "finished" else f"partial ({len(self.predictions())} rows)"
        raise ValueError(
            f"{self.path} holds a {state} run with a different config ({config_diff(stored, self.config)}); "
            "pass --overwrite to redo it, or choose another --out"
        )

    def _holds_results(self) -> bool:
        return bool(self.predictions()) or (self.path / METRICS_FILE).exists()

    def state(self) -> str | None:
        """'running', 'finished', 'error' or None (nothing written yet)."""
        status = self._read_json(STATUS_FILE)
        return status.get("state") if isinstance(status, dict) else None

    def predictions(self) -> list[dict[str, Any]]:
        """Rows read back, one per id (a later row replaces an earlier one); a torn last line is dropped."""
        file = self.path / PREDICTIONS_FILE
        rows: dict[Any, dict[str, Any]] = {}
        if not self.overwrite and file.exists():
            for line in file.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                rows[row.get("id")] = row
        return list(rows.values())

    def completed(self) -> list[dict[str, Any]]:
        """The rows that count as done: all but error rows whose input file changed (those run again)."""
        return [row for row in self.predictions() if not _stale(row)]

    def finished(self) -> bool:
        """Finished with valid metrics and nothing to retry: reuse `metrics()` and `predictions()` as they are."""
        if self.overwrite or self.state() != "finished":
            return False
        rows = self.predictions()
        metrics = self._read_json(METRICS_FILE)
        return _valid_metrics(metrics, len(rows)) is None and not any(_stale(r) for r in rows)

    def metrics(self) -> dict[str, Any]:
        return self._read_json(METRICS_FILE)

    # -- writing ---------------------------------------------------------------------------------------

    def start(self) -> RunDir:
        """Take the lock, apply overwrite, write the key and the "running" status. Idempotent."""
        if self._started or not self.writer:
            return self
        self.lock.acquire()
        try:
            if self.overwrite:
                for name in RUN_FILES:
                    (self.path / name).unlink(missing_ok=True)
                self.overwrite = False
            else:
                self._check_config()  # again, under the lock
                if self._read_json(CONFIG_FILE) not in (None, self.config):  # an empty run with another key
                    for name in RUN_FILES:
                        (self.path / name).unlink(missing_ok=True)
            write_json_atomic(self.path / CONFIG_FILE, self.config)
            (self.path / METRICS_FILE).unlink(missing_ok=True)  # finished only by finish()
            self._repair_predictions()
            self._set_status("running")
        except BaseException:
            self.lock.release()
            raise
        self._started = True
        return self

    def _repair_predictions(self) -> None:
        """Drop a torn last line (killed mid-write) before appending after it."""
        file = self.path / PREDICTIONS_FILE
        if not file.exists():
            return
        lines = file.read_text().splitlines()
        good = 0
        for line in lines:
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            good += 1
        if good != len(lines) or (lines and not file.read_text().endswith("\n")):
            write_atomic(file, "".join(line + "\n" for line in lines[:good]))

    def _set_status(self, state: str, error: str | None = None) -> None:
        status = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                  "info": self.info}
        if error is not None:
            status["error"] = error
        write_json_atomic(self.path / STATUS_FILE, status)

    def add_prediction(self, row: dict[str, Any]) -> None:
        """Append one finished example (fsynced: a kill loses at most the row being written)."""
        if not self.writer:
            return
        self.start()
        with open(self.path / PREDICTIONS_FILE, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, metrics: dict[str, Any]) -> None:
        """Write the metrics and mark the run finished; invalid metrics (no finite score, no examples) make
        it an error run instead, and raise."""
        problem = _valid_metrics(metrics, len(self.predictions()))
        if not self.writer:
            if problem:
                raise ValueError(f"{self.path}: no valid result ({problem})")
            return
        self.start()
        try:
            if problem:
                self._set_status("error", f"no valid result: {problem}")
                raise ValueError(f"{self.path}: no valid result ({problem}); the run is kept as an error, not finished")
            write_json_atomic(self.path / METRICS_FILE, metrics)
            self._set_status("finished")
        finally:
            self.close()

    write_metrics = finish  # the name domains used before

    def fail(self, error: BaseException | str) -> None:
        """Record a failure. A run without a single row leaves nothing behind; otherwise its rows stay for a
        resume and the status says what went wrong."""
        if not self.writer or not self._started:
            return
        try:
            if not self.predictions():
                for name in RUN_FILES:
                    (self.path / name).unlink(missing_ok=True)
            else:
                message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
                self._set_status("error", message.splitlines()[0] if message else type(error).__name__)
        finally:
            self.close()
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if empty

    def close(self) -> None:
        """Release the lock (the run stays as it is)."""
        self.lock.release()
        self._started = False

    def __enter__(self) -> RunDir:
        return self.start()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.fail(exc)
        else:
            self.close()
