"""The first-GPU-run checks of a backend against ONNX Runtime on the CPU in fp32 (what a first GPU run must show).

    python benchmarks/gpu_check.py checkpoint --config tiny|paper --out DIR/ckpt.pt    # random weights
    python benchmarks/gpu_check.py compare --engine-dir DIR [--backend onnxruntime-cuda] [--precisions fp32,fp16]
                                           [-n 32] [--steps 8] [--json out.json]

`compare` samples n token grids with the same seed on the backend (each precision) and on ONNX Runtime CPU fp32,
decodes the CPU's grids on both, and checks, per precision:
- tokens equal to the CPU fp32 run on >= 99% of grids (and, apart, to the CPU run of the same graphs: an fp16
  prior draws other tokens than the fp32 one wherever two codes are near-tied, on any provider);
- decode PSNR vs CPU fp32 >= 40 dB (fp16; recorded for fp32 too);
- the backend is the one asked for, every runner's session has the CUDA provider first and binds its I/O
  (ONNX Runtime CUDA), and backend_reason says so (truthful).
It prints one line per check and writes every figure to --json; the exit status is the number of failed checks.
On a CPU-only machine `--backend onnxruntime-cpu` rehearses everything but the CUDA parts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from movq_deploy.generator import Generator  # noqa: E402

CONFIGS = {"tiny": ("tiny", "tiny"), "paper": ("paper-f16", "paper")}  # --config -> (MoVQ preset, prior preset)
MIN_GRID_AGREEMENT = 0.99
MIN_FP16_PSNR_DB = 40.0


def make_checkpoint(config: str, out: Path, seed: int = 0) -> Path:
    """A checkpoint of freshly initialized models of `config` size (what the checks need is the graphs' numerics)."""
    import torch

    from movq_deploy.models.checkpoint import save_checkpoint
    from movq_deploy.models.movq import MoVQ, MoVQConfig
    from movq_deploy.models.prior import MaskGITPrior, PriorConfig

    torch.manual_seed(seed)
    tokenizer_preset, prior_preset = CONFIGS[config]
    tokenizer_config = MoVQConfig.preset(tokenizer_preset)
    prior_config = PriorConfig.preset(prior_preset, tokenizer_config)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(out, tokenizer_config=tokenizer_config.to_dict(), tokenizer=MoVQ(tokenizer_config).state_dict(),
                           prior_config=prior_config.to_dict(), prior=MaskGITPrior(prior_config).state_dict(),
                           record={"note": f"random weights for benchmarks/gpu_check.py ({config})"})


def psnr_db(images: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((images.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * float(np.log10(255.0 ** 2 / mse)))


def backend_facts(generator: Generator) -> dict:
    """What the backend really runs on: per runner, the providers of its session and whether it binds I/O."""
    facts = {"backend": generator.backend_name, "precision": generator.precision,
             "backend_reason": generator.backend_reason, "runners": {}}
    for name, runner in generator.backend.runners.items():
        session = getattr(runner, "session", None)
        facts["runners"][name] = {"type": type(runner).__name__,
                                  "providers": session.get_providers() if session is not None else None,
                                  "io_binding": bool(getattr(runner, "io_binding", False))}
    return facts


def compare(engine_dir: Path, backend: str, precisions: List[str], n: int, steps: int, seed: int = 0) -> dict:
    """Figures and pass/fail of each check, for each precision of `backend` against ONNX Runtime CPU fp32."""
    with Generator(engine_dir, backend="onnxruntime-cpu", precision="fp32") as cpu:
        tick = time.perf_counter()
        reference = cpu.sample_tokens(n=n, steps=steps, seed=seed)
        reference_images = cpu.decode(reference, output_type="np")
        report: Dict[str, dict] = {"reference": {"backend": "onnxruntime-cpu", "precision": "fp32",
                                                 "seconds": time.perf_counter() - tick}}
    for precision in precisions:
        with Generator(engine_dir, backend=backend, precision=precision) as generator:
            tick = time.perf_counter()
            tokens = generator.sample_tokens(n=n, steps=steps, seed=seed)
            images = generator.decode(reference, output_type="np")  # the same grids: the decoder alone
            seconds = time.perf_counter() - tick
            facts = backend_facts(generator)
        with Generator(engine_dir, backend="onnxruntime-cpu", precision=precision) as cpu:  # the same graphs
            same_graphs = cpu.sample_tokens(n=n, steps=steps, seed=seed)
        figures = {"grid_agreement": float((tokens == reference).all(axis=1).mean()),
                   "token_agreement": float((tokens == reference).mean()),
                   "grid_agreement_same_graphs": float((tokens == same_graphs).all(axis=1).mean()),
                   "decode_psnr_db": psnr_db(images, reference_images), "seconds": seconds}
        report[precision] = {**facts, **figures, "checks": _checks(backend, precision, figures, facts)}
    return report


def _checks(backend: str, precision: str, figures: dict, facts: dict) -> Dict[str, bool]:
    checks = {"tokens equal to CPU fp32 on >= 99% of grids": figures["grid_agreement"] >= MIN_GRID_AGREEMENT,
              "tokens equal to CPU, same graphs, on >= 99% of grids":
                  figures["grid_agreement_same_graphs"] >= MIN_GRID_AGREEMENT,
              "backend is the one asked for": facts["backend"] == backend}
    if precision == "fp16":
        checks["decode PSNR >= 40 dB"] = figures["decode_psnr_db"] >= MIN_FP16_PSNR_DB
    if backend == "onnxruntime-cuda":
        runners = facts["runners"].values()
        checks["CUDA provider first in every session"] = all(
            (r["providers"] or [""])[0] == "CUDAExecutionProvider" for r in runners)
        checks["I/O binding in use"] = all(r["io_binding"] for r in runners)
        checks["backend_reason says CUDA is in use"] = "CUDAExecutionProvider is in use" in facts["backend_reason"]
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("checkpoint", help="write a random-weight checkpoint")
    make.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    make.add_argument("--out", type=Path, required=True)
    check = commands.add_parser("compare", help="a backend against ONNX Runtime CPU fp32")
    check.add_argument("--engine-dir", type=Path, required=True)
    check.add_argument("--backend", default="onnxruntime-cuda")
    check.add_argument("--precisions", default="fp32,fp16")
    check.add_argument("-n", type=int, default=32)
    check.add_argument("--steps", type=int, default=None)
    check.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "checkpoint":
        print(make_checkpoint(args.config, args.out))
        return 0
    report = compare(args.engine_dir, args.backend, args.precisions.split(","), args.n, args.steps)
    failed = 0
    for precision in args.precisions.split(","):
        entry = report[precision]
        print(f"{args.backend} {precision}: grids {entry['grid_agreement']:.1%} (same graphs on the CPU: "
              f"{entry['grid_agreement_same_graphs']:.1%}), tokens {entry['token_agreement']:.2%}, decode PSNR "
              f"{entry['decode_psnr_db']:.1f} dB; reason: {entry['backend_reason']}")
        for name, passed in entry["checks"].items():
            print(f"  {'ok  ' if passed else 'FAIL'} {name}")
            failed += not passed
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return failed


if __name__ == "__main__":
    sys.exit(main())
