"""A/B timing of two versions of the code on a shared machine: fresh processes, alternating, paired ratios.

This VM's speed drifts by 2× between days and by ±30 % within minutes, so a change is judged by ratios of runs
made next to each other. ``ab_trees.py`` checks out ``--base`` (a commit) into a temporary git worktree and runs
a measuring script alternately with the base's package and the working tree's (each round in the other order
than the last, ``PYTHONPATH`` selecting the package), then reports, for every figure the script prints, both
medians and the median and range of the per-round ratios new / base.

The measuring script prints its figures as lines ``@name value`` (e.g. ``@build_ms 123.4``); any other output is
ignored. It is run as ``python SCRIPT ARGS...`` from the working tree's root, so it can import the benchmarks.

    python benchmarks/ab_trees.py --base HEAD~1 --rounds 6 -- my_timing.py 2 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def figures(output: str) -> dict[str, float]:
    """The ``@name value`` lines of a run's output."""
    found = {}
    for line in output.splitlines():
        if line.startswith("@"):
            name, value = line[1:].split()
            found[name] = float(value)
    return found


def run_rounds(trees: dict[str, Path], command: list[str], rounds: int) -> dict[str, dict[str, list[float]]]:
    """``rounds`` runs of ``command`` per tree, alternating (base first, then new first, ...): tree -> name -> values."""
    results: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in trees}
    order = list(trees)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            env = dict(os.environ, PYTHONPATH=str(trees[name]))
            done = subprocess.run([sys.executable, *command], env=env, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{name} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            for key, value in figures(done.stdout).items():
                results[name][key].append(value)
    return results


def report(results: dict[str, dict[str, list[float]]]) -> list[str]:
    """One line per figure: medians of base and new, and the per-round ratios new / base."""
    lines = []
    for key, base in results["base"].items():
        new = results["new"].get(key, [])
        if len(new) != len(base):
            lines.append(f"{key}: printed {len(base)} times by base, {len(new)} by new: not compared")
            continue
        ratios = [n / b for b, n in zip(base, new)]
        lines.append(f"{key}: base {statistics.median(base):.4g}, new {statistics.median(new):.4g}; new/base median "
                     f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}), {len(ratios)} rounds")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...: prints '@name value' lines")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.rounds < 1:
        parser.error("give --rounds >= 1 and a measuring script after --")
    with tempfile.TemporaryDirectory(prefix="ab_base_") as scratch:
        base = Path(scratch) / "tree"
        added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.base],
                               capture_output=True, text=True)
        if added.returncode != 0:
            raise SystemExit(f"cannot check out --base {args.base!r}: {added.stderr.strip()}")
        try:
            results = run_rounds({"base": base, "new": ROOT}, command, args.rounds)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=True)
    print(f"base {args.base}, new: the working tree; {args.rounds} rounds of: python {' '.join(command)}")
    print("\n".join(report(results)))


if __name__ == "__main__":
    main()
