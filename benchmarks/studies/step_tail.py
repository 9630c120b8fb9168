"""The prior step's sampling tail (inverse-CDF draw over K codes) in ONNX Runtime: flat CumSum vs a blocked one.

    python benchmarks/studies/step_tail.py [--shapes 8x256x512,64x256x512,1x1024x1024] [--threads 2]

ONNX Runtime's CPU profile of the tiny prior step puts much of its time in the CumSum over K (B*N*K elements;
BENCHMARKS.md has the profile). A two-level draw gives the same token: block totals (K/32 blocks of 32 codes),
CumSum over the blocks, pick the block, CumSum inside that block only: B*N*(K/32 + 32) cumulated elements instead
of B*N*K.
This script exports both forms (logits [B,N,K], uniform [B,N] -> token [B,N]) and times them, with their agreement.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from benchmarks.timing import summarize, time_calls  # noqa: E402
from movq_deploy.models.graphs import inverse_cdf_draw  # noqa: E402


class FlatDraw(torch.nn.Module):
    """The flat draw (PriorStepGraph's first form): count of cdf < uniform * total over all K codes."""

    def forward(self, logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        cdf = logits.log_softmax(-1).exp().cumsum(-1)  # (B, N, K)
        threshold = uniform[..., None] * cdf[..., -1:]  # (B, N, 1)
        return (cdf < threshold).float().sum(-1).clamp(max=logits.shape[-1] - 1).to(torch.int64)


class BlockedDraw(torch.nn.Module):
    """The two-level draw PriorStepGraph uses (movq_deploy.models.graphs.inverse_cdf_draw)."""

    def forward(self, logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        return inverse_cdf_draw(logits.log_softmax(-1).exp(), uniform)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="8x256x512,64x256x512,1x1024x1024", help="BxNxK, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    print("| B x N x K | flat CumSum p50 ms | blocked p50 ms | speed-up | same token |\n|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            batch, slots, codes = (int(x) for x in shape.split("x"))
            generator = torch.Generator().manual_seed(0)
            logits = torch.randn(batch, slots, codes, generator=generator) * 3
            uniform = torch.rand(batch, slots, generator=generator)
            feeds = {"logits": logits.numpy(), "uniform": uniform.numpy()}
            p50, tokens = {}, {}
            for name, module in (("flat", FlatDraw()), ("blocked", BlockedDraw())):
                path = f"{tmp}/{name}.onnx"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(module, (logits, uniform), path, dynamo=False, opset_version=18,
                                      input_names=["logits", "uniform"], output_names=["token"])
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                tokens[name] = session.run(None, feeds)[0]
                p50[name] = summarize(time_calls(lambda: session.run(None, feeds), args.budget_s), batch)["p50_ms"]
            same = float((tokens["flat"] == tokens["blocked"]).mean())
            print(f"| {shape} | {p50['flat']:.2f} | {p50['blocked']:.2f} | {p50['flat'] / p50['blocked']:.1f}x "
                  f"| {same:.4%} |")


if __name__ == "__main__":
    main()
