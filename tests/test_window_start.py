"""bench/window_start.py --smoke: the window paints before torch, transformers or peft is imported."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_heavy_is_imported_before_the_first_paint():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "window_start.py"), "--smoke"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "heavy modules imported before the first paint: none" in out.stdout, out.stdout
    assert "x the 2 s goal" in out.stdout
