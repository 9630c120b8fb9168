"""Where a benchmark's results go: <out>/<name>.json (everything measured) and <out>/<name>.md (the table), both
written atomically, the table printed too."""
from __future__ import annotations

import json
from pathlib import Path

from movq_deploy.files import atomic_write_text


def write_report(out: "str | Path", name: str, report: dict, text: str) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", text)
    print(text)
    return report
