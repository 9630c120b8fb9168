#!/usr/bin/env bash
# The first run on a GPU machine: every check of the TensorRT and ONNX Runtime CUDA paths that no CPU can make.
#
#   bash scripts/gpu_first_run.sh [OUT_DIR]         (from the repository root; OUT_DIR defaults to $OUT, else
#                                                    gpu-first-run/)
#   CONFIGS="tiny paper"   the random-weight models to export and check (default both; paper is the paper's size)
#   BACKEND=onnxruntime-cuda   the ONNX Runtime backend to check (onnxruntime-cpu rehearses the script on a CPU)
#   PYTHON=python3
#
# Steps (each logs to OUT_DIR/<step>.log; a failed step is reported and the others still run; the exit status is
# the number of failed steps):
#   environment      versions, providers, GPU, whether tensorrt / cuda-python / polygraphy import
#   checkpoint-*     a random-weight checkpoint per config; export-* exports it with fp32 + fp16 graphs
#   lint-*           TensorRT's ONNX parser rules on every fp32/fp16 graph
#   trt-build-*      (TensorRT only) fp32 and fp16 engines, each compared with ONNX Runtime through Polygraphy's
#                    comparator inside the build (the build fails above tolerance; figures in manifest.json)
#   trt-tests        (TensorRT only) engines vs ONNX Runtime, CUDA-graph replay == plain execution, Generator
#                    parity TensorRT vs ONNX Runtime, mismatch refusals, parser errors, CUDA buffers and capture
#   gpu-tests        the tests that need only a GPU (cuda-python buffers/capture, ONNX Runtime CUDA runner)
#   ort-*            Generator on $BACKEND vs ONNX Runtime CPU fp32, fp32 and fp16: tokens equal on >= 99% of
#                    grids, decode PSNR >= 40 dB (fp16), CUDA provider and I/O binding in use, backend_reason
#                    truthful (benchmarks/gpu_check.py; figures in OUT_DIR/ort-*.json)
#
# Needs in its python: numpy, pillow, torch, onnx, onnxscript, onnxruntime (onnxruntime-gpu for the CUDA checks:
# ../shared/gpu/ort-gpu-parts.sh carries 1.31.1 to a machine without network), polygraphy, pytest; tensorrt and
# cuda-python (cuda.bindings) for the TensorRT steps. The repository is used in place (PYTHONPATH=.).
set -u
OUT=${1:-${OUT:-gpu-first-run}}
PYTHON=${PYTHON:-python3}
CONFIGS=${CONFIGS:-tiny paper}
BACKEND=${BACKEND:-onnxruntime-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
failed=0

step() {  # step NAME COMMAND...: runs COMMAND, its output to OUT/NAME.log; reports and counts a failure
  local name=$1
  shift
  local start=$SECONDS
  echo "== $name: $*"
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED (exit $?, $((SECONDS - start)) s); last lines of $OUT/$name.log:"
    tail -n 8 "$OUT/$name.log" | sed 's/^/   | /'
    failed=$((failed + 1))
  fi
}

importable() { "$PYTHON" -c "import $1" > /dev/null 2>&1; }

step environment "$PYTHON" -c '
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("numpy", "torch", "onnx", "onnxruntime", "polygraphy", "tensorrt", "cuda.bindings"):
    try:
        module = importlib.import_module(name)
        print(f"{name:14s}", getattr(module, "__version__", "(no version)"))
    except ImportError as error:
        print(f"{name:14s} missing ({error})")
import onnxruntime, torch
print("ORT providers built in:", onnxruntime.get_available_providers())
print("torch CUDA:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
'

for config in $CONFIGS; do
  dir="$OUT/$config"
  step "checkpoint-$config" "$PYTHON" benchmarks/gpu_check.py checkpoint --config "$config" --out "$dir/ckpt.pt"
  step "export-$config" "$PYTHON" export/to_onnx.py "$dir/ckpt.pt" --out "$dir/engines" --fp16
  # every fp32/fp16 graph of the export (prior_guided too, for a class-conditional model; no int8 graphs here)
  step "lint-$config" "$PYTHON" -m movq_deploy.export.tensorrt_lint "$dir"/engines/*.onnx
done

if importable tensorrt && importable cuda.bindings.runtime; then
  for config in $CONFIGS; do
    step "trt-build-fp32-$config" "$PYTHON" export/build_trt.py --engine-dir "$OUT/$config/engines"
    step "trt-build-fp16-$config" "$PYTHON" export/build_trt.py --engine-dir "$OUT/$config/engines" --fp16
  done
  step trt-tests "$PYTHON" -m pytest -q -rs tests/backends/test_tensorrt.py tests/export/test_build_trt.py
else
  echo "== trt-*: tensorrt or cuda-python does not import here: engine builds, the Polygraphy comparison of"
  echo "   engines, Generator parity, CUDA-graph replay and the mismatch refusals did not run"
fi

step gpu-tests "$PYTHON" -m pytest -q -rs tests/backends/test_onnxruntime.py tests/backends/test_cuda.py

for config in $CONFIGS; do
  step "ort-$config" "$PYTHON" benchmarks/gpu_check.py compare --engine-dir "$OUT/$config/engines" \
    --backend "$BACKEND" --json "$OUT/ort-$config.json"
  cat "$OUT/ort-$config.log"
done

echo "== $failed step(s) failed; logs and figures in $OUT/"
exit "$failed"
