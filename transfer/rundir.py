"""Run directories: config.json, predictions.jsonl (one line per finished example), metrics.json.

A run that was killed resumes where it stopped (finished examples are read back and skipped); a run
whose metrics.json exists is finished and reused as is. Every table the suite prints is built from
these files, with the config saved beside the numbers.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any


def slug(*parts: Any) -> str:
    """A readable directory name from config parts (model paths shortened to their last component)."""
    clean = [re.sub(r"[^A-Za-z0-9.+-]+", "-", Path(str(p)).name if "/" in str(p) else str(p)) for p in parts]
    return "__".join(c.strip("-") for c in clean if c)


def fingerprint(path_or_id: str | Path | None) -> str:
    """Short content hash of a local model/NAMM's weight files, so a retrained artefact is not mistaken for
    a finished run; hub ids (not on disk) are returned as they are."""
    import hashlib

    if path_or_id is None:
        return ""
    path = Path(path_or_id)
    if not path.exists():
        return str(path_or_id)
    weights = (".safetensors", ".pt", ".bin")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in weights)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file and rename, so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | Path, config: dict[str, Any]) -> None:
        self.path = Path(path)
        self.config = config
        cfg_file = self.path / "config.json"
        if cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            if json.loads(json.dumps(config, sort_keys=True, default=str)) != old:
                raise ValueError(f"{self.path} holds a run with a different config; remove it or choose --out")
        else:
            write_json_atomic(cfg_file, config)
        pred_file = self.path / "predictions.jsonl"
        if pred_file.exists():  # drop a torn last line before appending after it
            good = self.predictions()
            if len(good) != len(pred_file.read_text().splitlines()):
                text = "".join(json.dumps(r, default=str) + "\n" for r in good)
                fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".predictions.")
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, pred_file)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    def finished(self) -> bool:
        return self.metrics_file.exists()

    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_file.read_text())

    def predictions(self) -> list[dict[str, Any]]:
        """Finished examples; a torn last line (killed mid-write) is dropped."""
        file = self.path / "predictions.jsonl"
        rows = []
        if file.exists():
            for line in file.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        return rows

    def add_prediction(self, row: dict[str, Any]) -> None:
        with open(self.path / "predictions.jsonl", "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json_atomic(self.metrics_file, metrics)
