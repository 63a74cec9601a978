"""benchmarks/gpu_check.py: the one-shot GPU check. Without a GPU it must exit 0 with a one-line report; its
helpers (time budget, tables, pytest's summary) and, on the CPU in ``--smoke`` mode, every row are checked."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _import_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu_check = _import_gpu_check()


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script measures everything")
def test_without_a_gpu_it_writes_the_no_cuda_report_and_exits_0(tmp_path):
    out = tmp_path / "sub" / "gpu_report.md"
    done = run_script("--out", str(out))
    assert done.returncode == 0, done.stderr
    report = out.read_text(encoding="utf-8")
    assert gpu_check.NO_CUDA in report and report.startswith("# GPU check")
    assert gpu_check.NO_CUDA in done.stdout


def test_help_shows_the_public_options_only():
    done = run_script("--help")
    assert done.returncode == 0, done.stderr
    assert "--out" in done.stdout and "--budget" in done.stdout
    assert "--smoke" not in done.stdout and "--device" not in done.stdout


@pytest.mark.parametrize("args, message", [(["--device", "cpu"], "only for --smoke"),
                                           (["--budget", "0"], "--budget must be > 0")])
def test_bad_arguments_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_budget_counts_down_on_its_clock():
    clock = FakeClock()
    budget = gpu_check.Budget(60, clock)
    assert budget.remaining() == 60 and budget.allows(60)
    clock.now += 45
    assert budget.elapsed() == 45 and budget.remaining() == 15
    assert budget.allows(15) and not budget.allows(16)
    clock.now += 100
    assert budget.remaining() == 0 and not budget.allows(1) and budget.allows(0)


@pytest.mark.parametrize("per_call, seconds, expected", [(0.5, 10, 10), (2.0, 10, 5), (20.0, 10, 3), (0.0, 1, 10)])
def test_repeats_within_clamps_to_the_bounds(per_call, seconds, expected):
    assert gpu_check.repeats_within(per_call, seconds, lo=3, hi=10) == expected


def test_markdown_table_formats_and_escapes_cells():
    table = gpu_check.markdown_table(["what", "ms", "diff", "status"], [
        {"what": "a | b", "ms": 1234.5678, "diff": 3.2e-7, "status": "error: line one\nline two"},
        {"what": "missing", "ms": 0.0},
    ])
    assert table.splitlines() == [
        "| what | ms | diff | status |",
        "| --- | --- | --- | --- |",
        "| a \\| b | 1.23e+03 | 3.20e-07 | error: line one line two |",
        "| missing | 0 | - | - |",
    ]
    assert gpu_check.format_cell(float("nan")) == "nan" and gpu_check.format_cell(True) == "True"
    assert gpu_check.format_cell(12.3456) == "12.3" and gpu_check.format_cell(7) == "7"


@pytest.mark.parametrize("output, expected", [
    ("..\n2 passed, 1 skipped, 424 deselected in 3.10s\n", {"passed": 2, "skipped": 1, "deselected": 424}),
    ("F.\n==== 1 failed, 1 passed, 1 error in 0.5s ====\n", {"failed": 1, "passed": 1, "errors": 1}),
    ("ERROR tests/x.py\n2 skipped, 3 errors in 1s\n", {"skipped": 2, "errors": 3}),
    ("crashed before the summary", {}),
])
def test_parse_pytest_summary_reads_the_last_summary_line(output, expected):
    counts = gpu_check.parse_pytest_summary(output)
    assert counts == {**dict.fromkeys(gpu_check.PYTEST_COUNTS, 0), **expected}


def test_max_diffs_are_absolute_and_relative_to_the_reference_scale():
    reference = torch.tensor([1.0, -4.0, 2.0])
    assert gpu_check.max_diffs(reference + torch.tensor([0.0, 0.02, -0.01]), reference) == pytest.approx((0.02, 0.005))
    assert gpu_check.max_diffs(torch.zeros(2), torch.zeros(2)) == (0.0, 0.0)
    assert gpu_check.max_diffs(torch.ones(2), torch.zeros(2)) == (1.0, float("inf"))
    row = gpu_check.comparison("x", reference * (1 + 2 * gpu_check.TOLERANCE), reference)
    assert row["status"].startswith("differs")
    with pytest.raises(ValueError, match="shapes differ"):
        gpu_check.max_diffs(torch.zeros(2), torch.zeros(3))


def test_run_steps_records_errors_skips_what_the_budget_cannot_fit_and_goes_on():
    clock = FakeClock()
    budget = gpu_check.Budget(100, clock)
    report = gpu_check.Report(["# test"])
    table = report.table("T", ["what", "value"])
    ran = []

    def slow():
        ran.append("slow")
        clock.now += 80  # leaves 20 s
        return [{"what": "slow", "value": 1.0}]

    def broken():
        ran.append("broken")
        raise RuntimeError("CUDA error: an illegal memory access")

    def cheap():
        ran.append("cheap")
        return [{"what": "cheap", "value": 2.0, "status": "differs"}]

    steps = [gpu_check.Step(table, "slow", slow, 10), gpu_check.Step(table, "broken", broken, 5),
             gpu_check.Step(table, "too big", lambda: ran.append("too big") or [], 30),
             gpu_check.Step(table, "cheap", cheap, 20)]
    gpu_check.run_steps(steps, budget, report, torch.device("cpu"))
    assert ran == ["slow", "broken", "cheap"]
    assert [(r["what"], r["status"]) for r in table.rows] == [
        ("slow", "ok"), ("broken", "error: RuntimeError: CUDA error: an illegal memory access"),
        ("too big", gpu_check.NOT_RUN), ("cheap", "differs")]
    assert all(r["peak MiB"] is None for r in table.rows if r["status"] != gpu_check.NOT_RUN)
    text = report.render()
    assert "illegal memory access" in text.split("## Details")[1]  # the traceback's tail
    assert [row["step"] for row in report.log] == ["slow", "broken", "too big", "cheap"]
    assert report.current is None and report.pending == []


def test_stop_unfinished_marks_the_running_step_and_the_pending_ones():
    report = gpu_check.Report(["# test"])
    table = report.table("T", ["what"])
    steps = [gpu_check.Step(table, name, list, 0) for name in ("running", "next", "last")]
    report.current, report.pending = steps[0], steps[1:]
    report.stop_unfinished("not finished: stopped")
    assert [(r["what"], r["status"]) for r in table.rows] == [
        ("running", "not finished: stopped"), ("next", gpu_check.NOT_RUN), ("last", gpu_check.NOT_RUN)]
    assert "| running | - | not finished: stopped |" in report.render()


@pytest.mark.slow
def test_smoke_mode_fills_every_row_on_the_cpu(tmp_path):
    out = tmp_path / "smoke.md"
    done = run_script("--device", "cpu", "--smoke", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stderr
    report = out.read_text(encoding="utf-8")
    assert "error:" not in report and gpu_check.NOT_RUN not in report, report
    steps = report.split("## Steps (wall time)")[1].split("## Details")[0]
    outcomes = [line.split("|")[3].strip() for line in steps.strip().splitlines()[2:]]
    assert len(outcomes) == 13 and set(outcomes) == {"ok"}, steps
    for row in ("| eval (fast path), symmetric |", "| train: d loss / d log_theta_beta |",
                "| build_lattice, random features |", "| DenseCRF (numpy in and out) |",
                "| torch.compile network + CRF vs eager: CRF logits |",
                "| inference 33×41, 3 classes, 10 iterations |",
                "bandwidths fixed |", "deeplabv2_resnet18_msc 33×33, batch 2, autocast None: network + CRF",
                "| pytest -q -m cuda"):
        assert row in report, row
