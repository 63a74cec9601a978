"""benchmarks/bench_bandwidth_gradient.py's ``drawn`` section: cases drawn at random, reproducible from the seed,
each within the accuracy section's ranges, with the layer's bandwidth gradient equal to the ideal at these sizes."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_bandwidth_gradient.py"
sys.path[:0] = [str(ROOT / "benchmarks")]

from bench_bandwidth_gradient import draw_case  # noqa: E402


def test_drawn_cases_are_reproducible_and_in_range():
    first = [draw_case(np.random.default_rng(4)) for _ in range(1)]
    rng = np.random.default_rng(4)
    cases = [draw_case(rng) for _ in range(50)]
    assert cases[0] == first[0] and len(set(cases)) == 50
    for kind, _, h, w, c, ws, wb, ta, tb, tg in cases:
        assert kind in ("synthetic", "textured", "natural")
        assert 16 <= h <= 24 and 16 <= w <= 32 and 3 <= c <= 5
        assert 1 <= ws <= 5 and 3 <= wb <= 10 and 10 <= ta <= 100 and 5 <= tb <= 30 and 1 <= tg <= 3


def test_drawn_section_reports_ours_equal_to_the_ideal():
    done = subprocess.run([sys.executable, str(BENCH), "--only", "drawn", "--cases", "1", "--seed", "3",
                           "--threads", "1"], capture_output=True, text=True, timeout=300, check=True)
    ratios = re.search(r"ours / ideal over all 6 bandwidth gradients: min (\S+) max (\S+)", done.stdout)
    assert ratios and abs(float(ratios[1]) - 1) < 1e-3 and abs(float(ratios[2]) - 1) < 1e-3, done.stdout
    for column in ("cos", "moments", "weights+μ", "ceiling"):
        assert re.search(rf"cosine {re.escape(column)} +min +-?[\d.]+ +median +-?[\d.]+ +\d/2 >= 0.98", done.stdout)
