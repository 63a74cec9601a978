"""benchmarks/bench_bandwidth_gradient.py's ``drawn`` section runs and reports the layer's bandwidth gradient equal
to the ideal on a drawn case, with each cosine's summary line, and the default layer's (the exact filter) equal to
the exact CRF's."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_bandwidth_gradient.py"


def test_drawn_section_reports_ours_equal_to_the_ideal():
    done = subprocess.run([sys.executable, str(BENCH), "--only", "drawn", "--cases", "1", "--seed", "3",
                           "--threads", "1"], capture_output=True, text=True, timeout=300, check=True)
    ratios = re.search(r"ours / ideal over all 6 bandwidth gradients: min (\S+) max (\S+)", done.stdout)
    assert ratios and abs(float(ratios[1]) - 1) < 1e-3 and abs(float(ratios[2]) - 1) < 1e-3, done.stdout
    for column in ("cos", "moments", "weights+μ", "ceiling", "default"):
        assert re.search(rf"cosine {re.escape(column)} +min +-?[\d.]+ +median +-?[\d.]+ +\d/2 >= 0.98", done.stdout)
    default = re.search(r"cosine default +min +(\S+)", done.stdout)  # the exact filter: the exact CRF's gradient
    assert float(default[1]) > 0.999, done.stdout
