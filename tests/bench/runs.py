"""Running ``python -m bench ...`` from the smoke tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_bench(kind: str, options: str, tmp_path: Path, timeout: float) -> tuple[str, Any]:
    """Run ``python -m bench KIND OPTIONS`` writing its report and JSON under ``tmp_path``;
    return the report (also checked to be what it printed) and the parsed results."""
    report_path, json_path = tmp_path / f"{kind}.txt", tmp_path / f"{kind}.json"
    out = ["--out", str(report_path), "--json", str(json_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", kind, *options.split(), *out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = report_path.read_text()
    assert report == proc.stdout
    return report, json.loads(json_path.read_text())
