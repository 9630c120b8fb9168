"""Export ckpt.pt to an engine directory of ONNX graphs, validated against PyTorch.

    python export/to_onnx.py ckpt.pt [--out engines/] [--steps T] [--guidance-scale W] [--fp16]
                                     [--int8 [--calibration-data DIR]] [--memory-budget SIZE]

Writes encoder.onnx, decoder.onnx, prior.onnx (+ encoder.fp16.onnx, decoder.fp16.onnx, prior.fp16.onnx with
--fp16, prior.int8.onnx, encoder.int8.onnx, decoder.int8.onnx with --int8) and manifest.json (movq_deploy.manifest).
A class-conditional prior also gets prior_guided.onnx (classifier-free guidance; .fp16/.int8 likewise).
The graphs are the torch modules of movq_deploy.models.graphs: uint8 images and int32 indices at the boundaries, a
dynamic batch axis named "batch".

Every graph is checked (onnx.checker, shape inference, no Random*/Multinomial ops, TopK only with a constant K) and
then run in ONNX Runtime (CPU) against PyTorch on fixed inputs at two batch sizes, as optimum validates its
exports; above tolerance the export fails and says which graph and by how much. The fp16 and int8 graphs are
compared with the fp32 graph and their agreement is stored in the manifest. Everything is written into a temporary
directory beside --out and renamed at the end, so a failed export leaves the previous engine directory intact.

Exporter: torch.onnx's dynamo exporter (torch.export) at opset 18, which names the batch axis on every input and
output and leaves no TorchScript Shape/Gather/Concat scaffolding. The library behind this command is
movq_deploy.export.
"""
from __future__ import annotations

import argparse
import sys

from movq_deploy.export.pipeline import export_engine_dir
from movq_deploy.memory import MemoryBudgetError
from movq_deploy.export.specs import ExportError, one_line


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="ckpt.pt with a tokenizer and a prior")
    parser.add_argument("--out", default="engines", help="engine directory to write (replaced atomically)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps recorded as the default (default: "
                                                                "the paper's, 12 for class-conditional priors, else 8)")
    parser.add_argument("--guidance-scale", type=float, default=0.0, metavar="W",
                        help="classifier-free guidance recorded as the default (class-conditional priors; default 0: "
                             "unguided)")
    parser.add_argument("--fp16", action="store_true", help="also write fp16 graphs (norms/softmax/sampling in fp32)")
    parser.add_argument("--int8", action="store_true",
                        help="also write int8 graphs for ONNX Runtime on the CPU: the prior-step graphs, the encoder and "
                             "decoder (static activation scales, calibrated on --calibration-data)")
    parser.add_argument("--calibration-data", metavar="DIR",
                        help="images that calibrate the int8 graphs (default: the tokenizer's training data, "
                             "else scikit-image's photographs)")
    parser.add_argument("--memory-budget", metavar="SIZE",
                        help="memory for the batched loops over images (calibration, comparisons), e.g. 4G (default: "
                             "$MOVQ_MEMORY_BUDGET, else a quarter of the memory available, at most 4 GB)")
    args = parser.parse_args(argv)
    try:
        export_engine_dir(args.checkpoint, args.out, steps=args.steps, fp16=args.fp16, int8=args.int8,
                          calibration_data=args.calibration_data, guidance_scale=args.guidance_scale,
                          memory_budget=args.memory_budget)
    except (FileNotFoundError, ValueError, ExportError, MemoryBudgetError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
