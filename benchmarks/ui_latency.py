"""How long the web page takes from a click on Sample to the image on screen, in headless Chromium.

    python benchmarks/ui_latency.py --engine-dir engines/ [--counts 1,16,64] [--repeats 5] [--out results/]

Serves the page over a local Generator (as `movq-deploy ui` does), clicks Sample with a new seed each time and waits
until the new grid has loaded in the browser. Beside each click-to-image time: the model's own time for the same
call (as the page reports it), so the rest is the page's cost (gradio's queue, PNG encoding, transfer, rendering).
Medians over --repeats clicks after one warm-up click per count. Needs the ui extra, selenium and Chromium.
"""
from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import load_average  # noqa: E402
from movq_deploy.ui.app import launch, local_page  # noqa: E402
from movq_deploy.ui.browser import PageDriver  # noqa: E402


def click_to_image(page: PageDriver, count: int, seed: int) -> "tuple[float, float]":
    """(seconds from the click to the new grid loaded in the browser, the model's seconds as the page reports)."""
    page.set_number("count", count)
    page.set_number("seed", seed)
    before = page.image_sources("#grid")
    start = time.perf_counter()
    page.click("sample")
    page.wait_until(lambda: page.driver.execute_script(
        "const img = document.querySelector('#grid img');"
        "return img !== null && img.complete && img.naturalWidth > 0 && !arguments[0].includes(img.src);", before),
        f"the grid of seed {seed}", timeout=600)
    seconds = time.perf_counter() - start
    status = page.wait_until(lambda: re.search(rf"seed {seed} · .* · ([0-9.]+) s", page.text("#sample-status")),
                             "the status line")
    return seconds, float(status.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", default="engines")
    parser.add_argument("--counts", default="1,16,64", help="images per click")
    parser.add_argument("--repeats", type=int, default=5, help="timed clicks per count (after one warm-up)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", default=None, help="folder for ui_latency.json")
    args = parser.parse_args()
    counts = [int(count) for count in args.counts.split(",")]

    blocks = local_page(args.engine_dir, backend=args.backend)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page = PageDriver(launch(blocks, port=port, block=False))
    rows, seed = [], 1000
    try:
        for count in counts:
            click_to_image(page, count, seed)  # warm-up
            timings = [click_to_image(page, count, seed + 1 + i) for i in range(args.repeats)]
            seed += args.repeats + 1
            page_s = statistics.median(t for t, _ in timings)
            model_s = statistics.median(m for _, m in timings)
            rows.append({"images": count, "click_to_image_s": round(page_s, 3), "model_s": round(model_s, 3),
                         "page_overhead_s": round(page_s - model_s, 3)})
    finally:
        page.close()
        blocks.close()

    load = load_average()
    print(f"{args.engine_dir}: median of {args.repeats} clicks; load average {load} (1/5/15 min)")
    print("| images | click to image (s) | model (s) | page overhead (s) |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['images']} | {row['click_to_image_s']:.3f} | {row['model_s']:.3f} "
              f"| {row['page_overhead_s']:.3f} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        result = {"engine_dir": args.engine_dir, "repeats": args.repeats, "rows": rows, "load_average": load}
        (Path(args.out) / "ui_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
