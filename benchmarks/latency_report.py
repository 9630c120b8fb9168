"""latency.py's report: the tables (full, short, targets), the loop-overhead line and the latency plot."""
from __future__ import annotations

import math
from pathlib import Path

from movq_deploy.files import atomic_path

STAGES = ("prior_step", "decode", "encode", "sample")


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def results_table(rows: list) -> str:
    lines = ["| model | stage | backend | precision | batch | p50 ms | p90 ms | p99 ms | images/s | x eager | GFLOP/s "
             "| % GEMM | calls |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        for row in (r for r in rows if r["stage"] == stage):
            head = f"| {row['model']} | {stage} | {row['backend']} | {row['precision']} | {row['batch']} |"
            if "skipped" in row:
                lines.append(f"{head} skipped: {row['skipped']} |||||||")
                continue
            lines.append(
                f"{head} {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f} | {row['images_per_s']:.1f}"
                f" | {_fmt(row.get('speedup_vs_eager'), '.2f')} | {row['gflops_per_s']:.1f}"
                f" | {row['gemm_fraction']:.0%} | {row['repeats']} |")
    return "\n".join(lines)


def summary_table(rows: list, batch_sizes: list) -> str:
    """The table a user reads first: per model, every path and peer, p50 of each stage, sample images/s, the
    speed-up over ONNX Runtime fp32 (the former default) and the prior's top-token agreement with fp32."""
    lines = ["| model | backend | precision | batch | prior step ms | decode ms | encode ms | sample ms | images/s "
             "| x ORT fp32 (sample) | top-token agreement |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = list(dict.fromkeys((r["model"], r["backend"], r["precision"]) for r in rows))
    for model, backend, precision in keys:
        for batch in batch_sizes:
            cell = {r["stage"]: r for r in rows if (r["model"], r["backend"], r["precision"], r["batch"]) ==
                    (model, backend, precision, batch) and "p50_ms" in r}
            if not cell:
                continue
            sample = cell.get("sample", {})
            agreement = next(iter(cell.values())).get("top_token_agreement")
            ms = [_fmt(cell.get(s, {}).get("p50_ms"), ".2f") for s in STAGES]
            lines.append(f"| {model} | {backend} | {precision} | {batch} | {' | '.join(ms)} | "
                         f"{_fmt(sample.get('images_per_s'), '.1f')} | {_fmt(sample.get('speedup_vs_ort'), '.2f')} | "
                         f"{_fmt(agreement, '.1%')} |")
    return "\n".join(lines)


def targets_table(targets: list) -> str:
    lines = ["| target | measured | met |", "|---|---:|---|"]
    for t in targets:
        value = t["value"]
        unit = t.get("unit") or ("%" if "%" in t["target"] else "x")
        shown = "not measured" if value is None else {"%": f"{value:.1%}", "dB": f"{value:.1f} dB",
                                                      "x": f"{value:.2f}x"}[unit]
        met = {True: "met", False: "**missed**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {shown}{' (' + t['detail'] + ')' if t['detail'] else ''} | {met} |")
    return "\n".join(lines)


def overhead_line(rows: list) -> str:
    parts = [f"{r['model']} {r['backend']} {r['precision']} n={r['batch']}: {r['loop_overhead']:.1%}"
             for r in rows if r["stage"] == "sample" and "loop_overhead" in r]
    return "Loop overhead (share of Generator.sample outside engine calls): " + ("; ".join(parts) or "not measured")


def plot(rows: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STAGES), figsize=(4.2 * len(STAGES), 3.8))
    for ax, stage in zip(axes, STAGES):
        keys = list(dict.fromkeys((r["model"], r["backend"], r["precision"]) for r in rows if r["stage"] == stage))
        for model, backend, precision in keys:
            points = sorted((r["batch"], r["p50_ms"]) for r in rows if "p50_ms" in r and r["stage"] == stage
                            and (r["model"], r["backend"], r["precision"]) == (model, backend, precision))
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{model} {backend} {precision}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(stage)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def title_of(report: dict) -> str:
    machine = report["machine"]
    models = ", ".join(model["name"] for model in report["models"])
    return (f"{machine['cpu_model']}, {machine['cores']} cores{', ' + machine['gpus'][0] if machine['gpus'] else ''}"
            f" - {models} model(s), {report['settings']['steps']} steps")


def rates_line(gemm: dict) -> str:
    parts = [f"{gemm['cpu_fp32_gflops']:.0f} GFLOP/s fp32"]
    if gemm.get("cpu_bf16_gflops"):
        parts.append(f"{gemm['cpu_bf16_gflops']:.0f} GFLOP/s bf16")
    if gemm.get("cpu_int8_gops"):
        parts.append(f"{gemm['cpu_int8_gops']:.0f} GOP/s int8")
    if gemm.get("gpu_fp16_gflops"):
        parts.append(f"{gemm['gpu_fp16_gflops']:.0f} GFLOP/s fp16 GPU")
    return "GEMM rates (best readings of the run): " + ", ".join(parts)


def report_markdown(report: dict) -> str:
    """latency.md: the title, the command, the run's conditions, the tables and the backends left out."""
    machine, rows, settings = report["machine"], report["results"], report["settings"]
    start_load, end_load = ((machine[key] or [None])[0] for key in ("load_average_at_start", "load_average_at_end"))
    load = (f"{report['started_utc']}, {report['duration_s']:.0f} s, {report['threads']} threads; load average "
            f"(1 min) {_fmt(start_load, '.1f')} at start, {_fmt(end_load, '.1f')} at end; {rates_line(report['gemm'])}")
    text = [f"## Latency ({title_of(report)})", "", f"`{report['command']}`", "", load, "",
            summary_table(rows, settings["batch_sizes"]), ""]
    for model in report["models"]:
        if model["auto_placement"]:
            text += [f"auto on the {model['name']} model: {model['auto_placement'].split('the CPU: ')[-1]}", ""]
        text += [f"Generator start-up on the {model['name']} model (s): " + "; ".join(
            f"{path} {value['cold']:g} cold, {value['warm']:g} warm" if isinstance(value, dict) else f"{path} {value:g}"
            for path, value in model["startup_s"].items()), ""]
    if not settings["quick"]:
        text += [results_table(rows), ""]
    text += [overhead_line(rows), "", targets_table(report["targets"] + [
        {**t, "target": f"{model['name']}: {t['target']}"} for model in report["models"] for t in model["targets"]]),
        ""]
    reasons = {}  # one line per model, backend and reason, naming its precisions
    for model in report["models"]:
        for s in model["skipped_backends"]:
            reasons.setdefault((model["name"], s["backend"], s["reason"]), []).append(s["precision"])
    text += [f"Skipped on {name}: {backend} ({', '.join(precisions)}): {reason}"
             for (name, backend, reason), precisions in reasons.items()]
    return "\n".join(text) + "\n"
