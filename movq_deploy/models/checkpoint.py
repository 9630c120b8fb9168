"""ckpt.pt: one file holding both stages' configs and weights (DESIGN.md, "ckpt.pt").

{"format": "movq-deploy-ckpt", "format_version": 1,
 "tokenizer_config": dict, "tokenizer": state_dict,
 "prior_config": dict, "prior": state_dict,        # absent after stage 1
 "class_names": list[str],                         # optional
 "record": dict}                                   # short training record (steps, data summary, metrics)

Only tensors and plain Python values, so `torch.load(path, weights_only=True)` loads it; written to a temporary
name and renamed. Optimizer and resume state live in a separate file (see movq_deploy/training/common.py).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from movq_deploy.files import atomic_path

FORMAT = "movq-deploy-ckpt"
FORMAT_VERSION = 1
REQUIRED = ("tokenizer_config", "tokenizer")
OPTIONAL = ("prior_config", "prior", "class_names", "record")


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def save_checkpoint(path: "str | os.PathLike[str]", **parts) -> Path:
    """Writes ckpt.pt atomically from tokenizer_config, tokenizer (+ prior_config, prior, class_names, record)."""
    unknown = set(parts) - set(REQUIRED) - set(OPTIONAL)
    if unknown:
        raise ValueError(f"unknown checkpoint parts: {', '.join(sorted(unknown))}")
    missing = [k for k in REQUIRED if parts.get(k) is None]
    if missing:
        raise ValueError(f"a checkpoint needs {', '.join(missing)}")
    if (parts.get("prior") is None) != (parts.get("prior_config") is None):
        raise ValueError("prior and prior_config go together: give both or neither")
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION}
    ckpt.update({k: v for k, v in parts.items() if v is not None})
    for key in ("tokenizer", "prior"):
        if key in ckpt:  # plain CPU tensors, detached from any module
            ckpt[key] = {name: t.detach().cpu().clone() for name, t in ckpt[key].items()}
    ckpt.setdefault("record", {})
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def load_checkpoint(path: "str | os.PathLike[str]") -> dict:
    """Loads and checks ckpt.pt (weights_only). One-line errors for missing, corrupt, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
        if is_zip:
            why = f"truncated or corrupt ({_one_line(e)})"
        elif isinstance(e, pickle.UnpicklingError):
            why = "not a torch checkpoint, or it holds objects other than tensors and plain values"
        else:
            why = f"not a torch checkpoint ({_one_line(e)})"
        raise ValueError(f"{path} cannot be loaded: {why}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a movq-deploy checkpoint (format {found!r}, expected {FORMAT!r})")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format version {ckpt.get('format_version')!r}; "
                         f"this code reads version {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    return ckpt


def load_models(path: "str | os.PathLike[str]", device: "str | torch.device" = "cpu", with_prior: bool = True):
    """-> (MoVQ, MaskGITPrior or None, ckpt dict), both models in eval mode on `device` (the prior None when the
    checkpoint has none, or with_prior=False)."""
    from movq_deploy.models.movq import MoVQ, MoVQConfig

    ckpt = load_checkpoint(path)
    movq = MoVQ(MoVQConfig.from_dict(ckpt["tokenizer_config"]))
    _load_state(movq, ckpt["tokenizer"], path, "tokenizer")
    movq.to(device).eval()
    prior = None
    if with_prior and "prior" in ckpt:
        from movq_deploy.models.prior import MaskGITPrior, PriorConfig

        prior = MaskGITPrior(PriorConfig.from_dict(ckpt["prior_config"]))
        _load_state(prior, ckpt["prior"], path, "prior")
        prior.to(device).eval()
    return movq, prior, ckpt


def _load_state(module: torch.nn.Module, state: dict, path, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: the {what} weights do not match its config: {_one_line(e)}") from None
