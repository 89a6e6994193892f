"""bench/ddp_cpu.py --smoke: the 2-process vs 1-process bench runs and its two runs agree."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ddp_cpu_bench_smoke():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "ddp_cpu.py"), "--smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"2 processes: [\d.]+ s/step \(median\)  ratio [\d.]+x of 1 process", result.stdout)
    differences = dict(re.findall(r"([\w/]+) ([\d.]+e[-+]\d+)", result.stdout.split("difference")[1]))
    assert set(differences) == {"loss", "rewards/margins", "grad_norm"}
    assert all(float(value) < 1e-3 for value in differences.values()), result.stdout  # without the gradient sum: grad_norm off by ~5
