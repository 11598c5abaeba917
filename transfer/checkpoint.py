"""NAMM checkpoints: our format, the reference implementation's torch checkpoint, the default NAMM.

Our format is a directory with `namm.safetensors` (theta, norm_mean, norm_var as float32) and `namm.json`
(format, format_version, config, param_size, norm_count, provenance). The reference format is
evo-memory's `ckpt.pt`/`latest.pt`: the CMA-ES state dict, whose mean is the solution. Both are
described in docs/namm-spec.md, section 10.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from transfer.atomic import atomic_dir
from transfer.namm import NAMMConfig, NAMMParams, NormStats, param_size

FORMAT = "namm-transfer"
FORMAT_VERSION = 1
WEIGHTS_FILE = "namm.safetensors"
META_FILE = "namm.json"
REFERENCE_FILE = "ckpt.pt"
# where the reference keeps the frozen normalisation statistics inside its CMA-ES state dict
_REF_NORM_PREFIX = "stored_buffers_to_save.token_embedding_0_"
# the NAMM this project evolved and ships; the one place that names it
DEFAULT_NAMM = Path(__file__).resolve().parents[1] / "artifacts" / "namm" / "namm-shipped"


def resolve_namm(path: str | os.PathLike | None) -> Path:
    """The checkpoint to use: `path`, or the shipped NAMM when it is None or empty."""
    return Path(path) if path else DEFAULT_NAMM


def _config_from_dict(d: dict[str, Any]) -> NAMMConfig:
    known = {f.name for f in fields(NAMMConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown NAMM config fields: {sorted(unknown)}")
    return NAMMConfig(**d)


def save_namm(path_dir: str | os.PathLike, theta: Tensor, norm: NormStats | None, cfg: NAMMConfig,
              provenance: dict) -> Path:
    """Write our checkpoint format (namm.safetensors + namm.json) atomically: temp dir, then rename."""
    from safetensors.torch import save_file

    size = param_size(cfg)
    if theta.dim() != 1 or theta.numel() != size:
        raise ValueError(f"theta must have shape [{size}], got {list(theta.shape)}")
    if not bool(torch.isfinite(theta).all()):
        raise ValueError("theta contains NaN or inf values")
    norm = norm if norm is not None else NormStats.empty(cfg)
    if norm.mean.shape != (cfg.n_bins,) or norm.var.shape != (cfg.n_bins,):
        raise ValueError(f"norm stats must have shape [{cfg.n_bins}], got {list(norm.mean.shape)}")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": asdict(cfg),
        "param_size": size,
        "norm_count": int(norm.count),
        "provenance": provenance,
    }
    try:
        meta_text = json.dumps(meta, indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"provenance must be JSON-serialisable: {e}") from None
    tensors = {
        "theta": theta.detach().to("cpu", torch.float32).contiguous(),
        "norm_mean": norm.mean.detach().to("cpu", torch.float32).contiguous(),
        "norm_var": norm.var.detach().to("cpu", torch.float32).contiguous(),
    }
    with atomic_dir(path_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(meta_text + "\n")
    return Path(path_dir)


def _strip_prefix(d: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("_orig_mod.", ""): v for k, v in d.items()}


def _load_ours(weights: Path) -> tuple[Tensor, NormStats, NAMMConfig, dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path = weights.parent / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{weights}: missing sibling {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path}: not a namm-transfer checkpoint (format={fmt!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta['format_version']} > supported {FORMAT_VERSION}")
    cfg = _config_from_dict(meta["config"])
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: unreadable safetensors file ({e})") from None
    missing = [k for k in ("theta", "norm_mean", "norm_var") if k not in tensors]
    if missing:
        raise ValueError(f"{weights}: missing tensors {missing}")
    theta = tensors["theta"].float()
    _check_theta(theta, cfg, weights)
    norm = _norm_from(tensors["norm_mean"], tensors["norm_var"], int(meta.get("norm_count", 0)), cfg, weights)
    return theta, norm, cfg, {"format": FORMAT, "provenance": meta.get("provenance", {})}


def _check_theta(theta: Tensor, cfg: NAMMConfig, where: Path) -> None:
    size = param_size(cfg)
    if theta.numel() != size or theta.dim() != 1:
        raise ValueError(f"{where}: theta has shape {list(theta.shape)}, expected [{size}]")
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(f"{where}: theta has {int((~torch.isfinite(theta)).sum())} NaN or inf values")


def _norm_from(mean: Tensor, var: Tensor, count: int, cfg: NAMMConfig, where: Path) -> NormStats:
    mean, var = mean.reshape(-1).to(torch.float64), var.reshape(-1).to(torch.float64)
    if mean.numel() != cfg.n_bins or var.numel() != cfg.n_bins:
        raise ValueError(f"{where}: norm stats have {mean.numel()}/{var.numel()} bins, expected {cfg.n_bins}")
    if count == 0:
        return NormStats.empty(cfg)
    if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()) or bool((var < 0).any()):
        raise ValueError(f"{where}: norm stats must be finite with a non-negative variance")
    return NormStats(mean, var, count)


def load_reference(path: str | os.PathLike) -> tuple[Tensor, NormStats, NAMMConfig, dict[str, Any]]:
    """evo-memory's torch checkpoint: theta = the CMA-ES mean, the non-best stored norm buffers."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise ValueError(f"{path}: cannot read torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("evolution_state"), dict):
        raise ValueError(f"{path}: not a reference NAMM checkpoint (no 'evolution_state' dict)")
    state = _strip_prefix(ckpt["evolution_state"])
    keys = ["mean"] + [_REF_NORM_PREFIX + s for s in ("output_mean", "output_var", "output_num")]
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{path}: evolution_state lacks keys {missing}")
    cfg = NAMMConfig()  # the released BAM runs; the reference checkpoint does not store its geometry
    theta = torch.as_tensor(state["mean"]).detach().float().reshape(-1)
    _check_theta(theta, cfg, path)
    count = int(torch.as_tensor(state[_REF_NORM_PREFIX + "output_num"]).max())
    norm = _norm_from(torch.as_tensor(state[keys[1]]), torch.as_tensor(state[keys[2]]), count, cfg, path)
    prov = {k: (v.item() if isinstance(v, Tensor) and v.numel() == 1 else v)
            for k, v in ckpt.items() if k in ("iter_num", "best_val_loss")}
    return theta, norm, cfg, {"format": "evo-memory-torch", "provenance": prov}


def _load_any(path: str | os.PathLike) -> tuple[Tensor, NormStats, NAMMConfig, dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"NAMM checkpoint not found: {p}")
    if p.is_dir():
        if (p / WEIGHTS_FILE).is_file():
            return _load_ours(p / WEIGHTS_FILE)
        if (p / REFERENCE_FILE).is_file():
            return load_reference(p / REFERENCE_FILE)
        raise ValueError(f"{p}: directory holds neither {WEIGHTS_FILE} nor a reference {REFERENCE_FILE}")
    if p.suffix == ".safetensors":
        return _load_ours(p)
    if p.suffix in (".pt", ".pth"):
        return load_reference(p)
    raise ValueError(f"{p}: unknown NAMM checkpoint format (want a directory, .safetensors or .pt)")


def load_namm(path: str | os.PathLike | None = None) -> tuple[Tensor, NormStats, NAMMConfig]:
    """theta, norm stats and config from our directory/safetensors or a reference torch .pt.

    None loads the shipped NAMM (`resolve_namm`). Non-finite parameters or statistics are refused: they
    would turn every score into NaN and the run into a silent full cache.
    """
    theta, norm, cfg, _ = _load_any(resolve_namm(path))
    return theta, norm, cfg


def inspect_namm(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Summary for `namm inspect`: format, config, parameter count and norms, norm stats, provenance."""
    path = resolve_namm(path)
    theta, norm, cfg, meta = _load_any(path)
    params = NAMMParams.from_flat(theta, cfg)
    names = ("w_qkv", "b_qkv", "w_o", "b_o", "w_m", "b_m")
    blocks = {name: float(block.norm()) for name, block in zip(names, params.blocks())}
    summary: dict[str, Any] = {
        "path": str(path),
        "format": meta["format"],
        "config": asdict(cfg),
        "param_count": theta.numel(),
        "theta": {"l2": float(theta.norm()), "abs_max": float(theta.abs().max()),
                  "nonzero": int((theta != 0).sum()), "block_l2": blocks},
        "norm": {"count": norm.count},
        "provenance": meta["provenance"],
    }
    if norm.count > 0:
        std = norm.var.sqrt()
        summary["norm"]["mean"] = [round(float(v), 6) for v in norm.mean]
        summary["norm"]["std"] = [round(float(v), 6) for v in std]
    return summary
