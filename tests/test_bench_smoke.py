"""Every bench in its --smoke mode (a tiny random model, 2 steps), so that none can rot unnoticed.

TRL's side runs where its virtual environment has been made (bench/.venv-trl, by running
bench/dpo_vs_trl.py or bench/grpo_vs_trl.py once; bench/.venv-trl029 for PPO): making one downloads
TRL and its dependencies, which a test should not do.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def trl_ready(venv: str) -> bool:
    python = ROOT / "bench" / venv / "bin" / "python"
    return python.exists() and subprocess.run([python, "-c", "import trl"], capture_output=True).returncode == 0


def run_bench(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *args], capture_output=True,
                            text=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", line)]


def test_dpo_bench_smoke():
    configs = "ours:4,trl,trl-tuned" if trl_ready(".venv-trl") else "ours:4"
    output = run_bench("dpo_vs_trl.py", "--threads", "1", "--configs", configs)
    seconds = next(line for line in output.splitlines() if line.startswith("wall s/step"))
    assert len(numbers(seconds)) == len(configs.split(",")) and all(s > 0 for s in numbers(seconds))
    if "trl" in configs:  # both TRL configurations train the same model on the same pairs as ours
        assert "trl / ours:4" in output and "trl-tuned / ours:4" in output
        step_one_loss = numbers(next(line for line in output.splitlines() if line.startswith("step 1 loss")))
        assert max(step_one_loss) - min(step_one_loss) < 1e-4


def test_grpo_bench_smoke():
    sides = "ours,trl" if trl_ready(".venv-trl") else "ours"
    output = run_bench("grpo_vs_trl.py", "--threads", "1", "--sides", sides)
    rows = {line.split("(")[0].strip(): numbers(line) for line in output.splitlines() if "(median of steps" in line}
    for key in ("seconds", "generation", "scoring", "training"):
        assert len(rows[key]) == len(sides.split(",")) and all(s > 0 for s in rows[key])
    assert ("TRL / ours: s/step" in output) == ("trl" in sides)


def test_ppo_bench_smoke():
    args = ["--rules-only"] + ([] if trl_ready(".venv-trl029") else ["--skip-trl"])
    output = run_bench("ppo_vs_trl.py", *args)
    assert re.search(r"studio PPO with the demo rule reward: \[[\d., ]+\]\n  \d+\.\d+ s/step", output)


def test_linear_kernels_bench_smoke():
    from studio.core.cpu_linears import onednn_available

    if not onednn_available():
        pytest.skip("oneDNN's linear op needs an x86 CPU")
    output = run_bench("linear_kernels.py")
    rows = [line for line in output.splitlines() if " x " in line and "GFLOP/s" not in line]
    assert len(rows) == 6
    for row in rows:  # torch GFLOP/s, oneDNN GFLOP/s, ratio, relative difference of the results
        default, onednn, ratio, difference = (float(value.rstrip("x")) for value in row.split()[-4:])
        assert default > 0 and onednn > 0 and ratio > 0 and difference < 1e-4


def test_ui_responsiveness_bench_smoke():
    output = run_bench("ui_responsiveness.py")
    launch = next(line for line in output.splitlines() if line.startswith("window shown after launch"))
    assert numbers(launch)[0] > 0
    assert "redraw 4x2k, smoothing 0.6: median" in output
    trained = next(line for line in output.splitlines() if line.startswith("# DPO on a tiny random model"))
    assert int(re.search(r"(\d+) steps", trained).group(1)) >= 1
