"""Build TensorRT engines from an engine directory's ONNX graphs, check them against ONNX Runtime, record them.

    python export/build_trt.py [--engine-dir engines/] --fp16 [--min-batch 1 --opt-batch N --max-batch 64]
                               [--workspace-gb 4] [--opt-level 3] [--timing-cache PATH] [--no-tf32] [--force]

The library is movq_deploy/export/tensorrt_build.py (what is built, checked and recorded, and why). Without
TensorRT or without a GPU this exits 1 with one line saying which, having written nothing; so does an engine that
disagrees with ONNX Runtime beyond tolerance (nothing of it is written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from movq_deploy.engine_cache import DEFAULT_OPT_LEVEL, TIMING_CACHE_NAME
from movq_deploy.export.tensorrt_build import DEFAULT_OPT_BATCH, BuildOptions, build_engines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", type=Path, default=Path("engines"),
                        help="engine directory written by export/to_onnx.py")
    parser.add_argument("--fp16", action="store_true",
                        help="build from the fp16 ONNX graphs (default: fp32, TF32 allowed)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=None,
                        help="the batch TensorRT tunes its kernels for (default: how the Generator calls each graph: "
                             + ", ".join(f"{graph} {batch}" for graph, batch in DEFAULT_OPT_BATCH.items()) + ")")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace memory pool limit (GiB)")
    parser.add_argument("--opt-level", type=int, default=DEFAULT_OPT_LEVEL, choices=range(6),
                        help=f"builder optimization level 0-5 (default {DEFAULT_OPT_LEVEL}, TensorRT's)")
    parser.add_argument("--timing-cache", type=Path, default=None,
                        help=f"timing cache file (default: ENGINE_DIR/{TIMING_CACHE_NAME})")
    parser.add_argument("--no-tf32", action="store_true", help="keep fp32 math in full fp32 (TF32 is on by default)")
    parser.add_argument("--force", action="store_true", help="rebuild even the engines that are up to date")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = BuildOptions(precision="fp16" if args.fp16 else "fp32", min_batch=args.min_batch,
                           max_batch=args.max_batch, opt_batch=args.opt_batch, workspace_gb=args.workspace_gb,
                           opt_level=args.opt_level, timing_cache=args.timing_cache, tf32=not args.no_tf32,
                           force=args.force)
    try:
        build_engines(args.engine_dir, options)
    except (ImportError, RuntimeError, ValueError, OSError) as error:
        print(f"build_trt.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
