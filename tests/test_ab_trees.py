"""benchmarks/ab_trees.py: the A/B timing of a commit against the working tree."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ab_trees.py"

spec = importlib.util.spec_from_file_location("ab_trees", SCRIPT)
ab_trees = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab_trees)


def test_figures_and_paired_ratios():
    assert ab_trees.figures("warming up\n@build_ms 120\n@step 3.5e-1\nnoise @x 1\n") == {"build_ms": 120.0, "step": 0.35}
    results = {"base": {"t": [100.0, 200.0, 110.0], "u": [1.0]}, "new": {"t": [90.0, 100.0, 110.0], "u": []}}
    lines = ab_trees.report(results)
    # ratios per round 0.9, 0.5, 1.0: the median pairs rounds, not the medians of each side (105 / 110)
    assert lines[0] == "t: base 110, new 100; new/base median 0.900 (0.500-1.000), 3 rounds"
    assert lines[1] == "u: printed 1 times by base, 0 by new: not compared"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_runs_each_tree_with_its_own_package(tmp_path):
    measure = tmp_path / "measure.py"
    measure.write_text(
        "import importlib.util\n"
        "from pathlib import Path\n"
        "package = Path(importlib.util.find_spec('crfrnn_deeplab').origin).resolve()  # found, not imported\n"
        f"new = package.is_relative_to({str(ROOT.resolve())!r})\n"
        "print('@marker', 2.0 if new else 1.0)\n"
    )
    done = subprocess.run([sys.executable, str(SCRIPT), "--base", "HEAD", "--rounds", "2", "--", str(measure)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "marker: base 1, new 2; new/base median 2.000 (2.000-2.000), 2 rounds" in done.stdout
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "ab_base_" not in worktrees  # removed again


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_bad_arguments_are_named():
    done = subprocess.run([sys.executable, str(SCRIPT), "--base", "no-such-revision", "--", "x.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "cannot check out --base 'no-such-revision'" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "--base", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "a measuring script after --" in done.stderr
