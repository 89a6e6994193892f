"""bench/ddp_cpu.py --smoke: the 2-process vs 1-process bench runs and its two runs agree (DPO, and
PPO, whose processes each sample half of the step's rollouts)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("method, compared", [
    ("dpo", {"loss", "rewards/margins", "grad_norm"}),
    ("ppo", {"loss/policy_avg", "objective/scores", "objective/kl"}),
])
def test_ddp_cpu_bench_smoke(method, compared):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "ddp_cpu.py"), "--smoke", "--method", method],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"2 processes: [\d.]+ s/step \(median\)  ratio [\d.]+x of 1 process", result.stdout)
    differences = dict(re.findall(r"([\w/]+) ([\d.]+e[-+]\d+)", result.stdout.split("difference")[1]))
    assert set(differences) == compared
    assert all(float(value) < 1e-3 for value in differences.values()), result.stdout  # without the gradient sum: grad_norm off by ~5
    if method == "ppo":
        assert "rollouts sampled per step by one process: 4 (1 process), 2 (2 processes)" in result.stdout
