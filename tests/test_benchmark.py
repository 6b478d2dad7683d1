"""The benchmark script keeps working (its --quick mode: tiny models, one run)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_quick_mode_runs_every_method(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--cache",
         str(tmp_path / "cache"), "--output", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = out.read_text()
    for method in ("linear", "ties", "slerp", "dare_ties", "passthrough"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "FAILED" not in row
        wall, cpu, rss = float(cells[1]), float(cells[2]), float(cells[3])
        assert wall > 0 and cpu > 0 and rss > 0
        assert float(cells[5]) > 0  # bytes written
