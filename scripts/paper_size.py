"""The paper's size end to end on this machine: every stage in a process of its own, timed, with its peak memory.

    python scripts/paper_size.py [--out runs/paper-size] [--only STAGE[,STAGE...]] [--memory-limit 21G]

From a randomly initialized paper-f16 tokenizer (77M parameters, 256x256 -> 16x16x4) and the paper prior (307M):

    tokenizer            train/tokenizer.py --config paper-f16: 1 step at batch 1, then its held-out evaluation
    prior-b1, prior-b8   train/prior.py --config paper on it: 1 step at batch 1, and at batch 8 (16 cached crops)
    export               export/to_onnx.py --fp16 --int8: fp32, fp16 and int8 graphs, OpenVINO's bf16 validation
                         and int8 graphs where openvino (and nncf) are installed
    build-trt            export/build_trt.py --fp16: skips here with its reason when TensorRT is missing
    sample-*-n1, -n16    movq-deploy sample -n 1 and -n 16 on each CPU path: ONNX Runtime fp32 and int8, OpenVINO
                         fp32, bf16 and int8, and "auto"
    edit                 movq-deploy edit: a centre box of a sample regenerated
    serve                movq-deploy serve (Ray Serve, one replica) and one request answered
    bulk                 movq-deploy generate --num-images 16 (Ray Data)

Each stage's wall time and peak memory: the largest resident set of its process (the kernel's own count, from
wait4) and the peak proportional set size of its whole process tree (Ray's and the DataLoader's processes
included, shared pages counted once; sampled every half second). A stage whose tree passes --memory-limit is killed
and reported, so that it never takes the machine down. Writes OUT/paper_size.json, OUT/paper_size.md (the table in
BENCHMARKS.md), each stage's log and its memory over time (OUT/<stage>.memory.csv).

The CPU rehearsal of the first GPU run: every stage here must pass on the CPU, so that a lent GPU's minutes go to
scripts/gpu_first_run.sh's GPU steps only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from movq_deploy.memory import format_bytes, parse_bytes  # noqa: E402

PYTHON = sys.executable
CLI = [PYTHON, "-m", "movq_deploy.cli"]
SAMPLE_PATHS = [("onnxruntime-cpu", "fp32"), ("onnxruntime-cpu", "int8"), ("openvino", "fp32"), ("openvino", "bf16"),
                ("openvino", "int8"), ("auto", "auto")]
# The targets (peak memory of the stage's process tree)
TARGETS = {"prior-b1": 12 << 30, "prior-b8": 12 << 30, "export": 16 << 30,
           **{f"sample-{b}-{p}-n16": 8 << 30 for b, p in SAMPLE_PATHS}}


@dataclass
class Result:
    stage: str
    command: str
    status: str = "not run"  # "ok", "failed (exit N)", "killed: memory limit", "skipped: why"
    seconds: float = 0.0
    max_rss: int = 0  # bytes: the largest resident set of the stage's process (wait4)
    tree_pss: int = 0  # bytes: the peak proportional set size of its process tree (sampled)
    notes: List[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.max_rss, self.tree_pss)


# ---- measuring a process tree --------------------------------------------------------------------------------


def _tree(pid: int) -> List[int]:
    """pid and its descendants, from /proc (psutil is not a dependency of the runtime)."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, []))
    return found


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples the proportional set size of a process tree every `period` s: its peak, its series, and a kill of
    the whole tree when it passes `limit` bytes."""

    def __init__(self, pid: int, limit: int, series: Path, period: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.limit, self.period, self.series = pid, limit, period, series
        self.peak, self.killed, self.done = 0, False, threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        with open(self.series, "w") as out:
            out.write("seconds,tree_pss_bytes\n")
            while not self.done.is_set():
                pids = _tree(self.pid)
                total = sum(_pss(pid) for pid in pids)
                self.peak = max(self.peak, total)
                out.write(f"{time.monotonic() - self.start_time:.1f},{total}\n")
                out.flush()
                if total > self.limit and not self.killed:
                    self.killed = True
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                self.done.wait(self.period)


def run_stage(result: Result, argv: List[str], out: Path, limit: int, env: Optional[dict] = None,
              during: Optional[Callable[[subprocess.Popen], None]] = None, skip_marker: str = "") -> Result:
    """Runs argv as the stage's process (its output to OUT/<stage>.log, each line stamped with the seconds since
    the start); `during(process)` runs while it does (serve: a request, then an interrupt). A failure whose output
    holds `skip_marker` is the stage skipping itself (build_trt.py without TensorRT), with that line as reason."""
    result.command = " ".join(argv)
    print(f"== {result.stage}: {result.command}", flush=True)
    log_path = out / f"{result.stage}.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                                   start_new_session=True)
        sampler = TreeSampler(process.pid, limit, out / f"{result.stage}.memory.csv")
        sampler.start()

        def copy_output():
            for line in process.stdout:
                log.write(f"{time.monotonic() - start:8.1f}  {line}")
                log.flush()

        copier = threading.Thread(target=copy_output, daemon=True)
        copier.start()
        try:
            if during is not None:
                during(process)
        except Exception as error:  # the stage's check failed: stop it, report why
            result.notes.append(f"check failed: {error}")
            os.killpg(process.pid, signal.SIGINT)
        _, status, usage = os.wait4(process.pid, 0)
        copier.join(timeout=10)
        sampler.done.set()
        sampler.join()
    result.seconds = round(time.monotonic() - start, 1)
    result.max_rss = usage.ru_maxrss * 1024
    result.tree_pss = sampler.peak
    code = os.waitstatus_to_exitcode(status)
    if sampler.killed:
        result.status = f"killed: its processes passed {format_bytes(limit)}"
    elif code == 0 and not result.notes:
        result.status = "ok"
    else:
        lines = log_path.read_text().splitlines()
        reason = next((line for line in lines if skip_marker and skip_marker in line), None)
        if reason is not None:
            result.status = "skipped: " + reason.strip().split(None, 1)[-1]  # without the time stamp
        else:
            result.status = f"failed (exit {code})"
            result.notes += [line.strip() for line in lines[-3:]]
    print(f"   {result.status}, {result.seconds:.0f} s, process {format_bytes(result.max_rss)}, tree "
          f"{format_bytes(result.tree_pss)}", flush=True)
    return result


# ---- the stages ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve_one_request(port: int, out: Path, timeout_s: float = 900.0):
    """While `movq-deploy serve` runs: wait for it to answer, sample one image through it, then interrupt it."""
    def during(process: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout_s
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/sample", method="POST",
                                         data=json.dumps({"n": 1, "seed": 0, "format": "png"}).encode(),
                                         headers={"content-type": "application/json"})
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}) before answering")
            try:
                with urllib.request.urlopen(request, timeout=600) as answer:
                    (out / "served.png").write_bytes(answer.read())
                    break
            except OSError as error:  # not listening yet, or its replica still starting (503)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no answer in {timeout_s:.0f} s: {error}")
                time.sleep(2)
        os.killpg(process.pid, signal.SIGINT)
    return during


def _edit_inputs(out: Path) -> "tuple[Path, Path]":
    """A sample to edit (the n=1 sample of the first path that made one) and a mask of its centre box."""
    from PIL import Image

    grid = next((p for p in sorted(out.glob("sample-*-n1.png"))), None)
    if grid is None:
        raise FileNotFoundError("no sample-*-n1.png to edit: run a sample stage first")
    # the sample inside its one-image grid's border (make_grid's padding)
    size = json.loads((out / "engines" / "manifest.json").read_text())["image_size"]
    sample = Image.open(grid)
    pad = (sample.size[0] - size) // 2
    image = out / "edit_input.png"
    sample.crop((pad, pad, pad + size, pad + size)).save(image)
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    mask_path = out / "edit_mask.png"
    mask.save(mask_path)
    return image, mask_path


def stages(out: Path) -> List["tuple[str, Callable[[], tuple]]"]:
    """(name, make) in order; make() -> (argv, env, during[, skip_marker]) or raises to skip the stage with its
    reason (run_stage)."""
    ckpt, engines = out / "ckpt.pt", out / "engines"

    def tokenizer():
        return [PYTHON, "train/tokenizer.py", "--config", "paper-f16", "--out", str(out), "--steps", "1",
                "--batch-size", "1", "--eval-every", "1", "--save-every", "1", "--quiet"], None, None

    def prior(batch):
        def make():
            return [PYTHON, "train/prior.py", "--ckpt", str(ckpt), "--config", "paper", "--steps", "1",
                    "--batch-size", str(batch), "--num-crops", "16", "--eval-every", "1", "--save-every", "1",
                    "--quiet"], None, None
        return make

    def export():
        return [PYTHON, "export/to_onnx.py", str(ckpt), "--out", str(engines), "--fp16", "--int8"], None, None

    def build_trt():
        return [PYTHON, "export/build_trt.py", "--engine-dir", str(engines), "--fp16"], None, None, \
            "TensorRT is not installed"

    def sample(backend, precision, n):
        def make():
            return CLI + ["sample", "--engine-dir", str(engines), "--backend", backend, "--precision", precision,
                          "-n", str(n), "--seed", "0", "--out", str(out / f"sample-{backend}-{precision}-n{n}.png")], \
                None, None
        return make

    def edit():
        image, mask = _edit_inputs(out)
        return CLI + ["edit", "--engine-dir", str(engines), "--image", str(image), "--mask", str(mask), "--seed", "0",
                      "--out", str(out / "edit.png")], None, None

    def serve():
        port = _free_port()
        return CLI + ["serve", "--engine-dir", str(engines), "--replicas", "1", "--port", str(port)], None, \
            _serve_one_request(port, out)

    def bulk():
        shutil.rmtree(out / "bulk", ignore_errors=True)
        return CLI + ["generate", "--engine-dir", str(engines), "--num-images", "16", "--seed", "0", "--workers", "1",
                      "--out", str(out / "bulk")], None, None

    listed = [("tokenizer", tokenizer), ("prior-b1", prior(1)), ("prior-b8", prior(8)), ("export", export),
              ("build-trt", build_trt)]
    for backend, precision in SAMPLE_PATHS:
        for n in (1, 16):
            listed.append((f"sample-{backend}-{precision}-n{n}", sample(backend, precision, n)))
    return listed + [("edit", edit), ("serve", serve), ("bulk", bulk)]


# ---- the report ----------------------------------------------------------------------------------------------


def markdown(results: List[Result], machine: str) -> str:
    lines = [f"Machine: {machine}. Peak memory: the stage's process (wait4) and its whole process tree "
             "(proportional set size, sampled every 0.5 s); the target applies to the larger.", "",
             "| stage | status | wall s | process peak | tree peak | target | met |", "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        target = TARGETS.get(r.stage)
        met = "" if target is None or r.status != "ok" else ("met" if r.peak <= target else "**missed**")
        lines.append(f"| {r.stage} | {r.status} | {r.seconds:.0f} | {format_bytes(r.max_rss)} | "
                     f"{format_bytes(r.tree_pss)} | {format_bytes(target) if target else ''} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/paper-size", help="folder for everything (default runs/paper-size)")
    parser.add_argument("--only", help="comma-separated stage names (default: all, in order)")
    parser.add_argument("--memory-limit", default="21G", help="kill a stage whose process tree passes this (21G)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    limit = parse_bytes(args.memory_limit)
    chosen = set(args.only.split(",")) if args.only else None
    known = [name for name, _ in stages(out)]
    if chosen and chosen - set(known):
        parser.error(f"--only: unknown stage(s) {', '.join(sorted(chosen - set(known)))}; stages: {', '.join(known)}")
    report = out / "paper_size.json"
    previous = {r["stage"]: r for r in json.loads(report.read_text())["stages"]} if report.is_file() else {}
    results = []
    for name, make in stages(out):
        if chosen and name not in chosen:
            if name in previous:  # a stage of an earlier run, kept in the table
                results.append(Result(**previous[name]))
            continue
        result = Result(name, "")
        try:
            how = make()
        except Exception as error:
            result.status = f"skipped: {error}"
            print(f"== {name}: {result.status}", flush=True)
        else:
            run_stage(result, how[0], out, limit, *how[1:])
        results.append(result)
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                  f"{format_bytes(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))}"
        report.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine,
                                      "stages": [asdict(r) for r in results]}, indent=2))
        (out / "paper_size.md").write_text(markdown(results, machine))
    failed = [r.stage for r in results if not (r.status == "ok" or r.status.startswith("skipped"))]
    print((out / "paper_size.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
