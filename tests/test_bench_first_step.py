"""bench/first_step.py --smoke: a 4-step DPO run on the tiny model reaches step 1 with a short reference pass."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_first_step_bench_smoke():
    result = subprocess.run([sys.executable, "bench/first_step.py", "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "reference pass: 16 of 40 pairs" in result.stdout  # 4 steps of 4 pairs, not all 40
    assert "time to step 1:" in result.stdout and "Loading the model" in result.stdout
