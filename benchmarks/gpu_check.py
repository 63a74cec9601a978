"""One-shot GPU check (issue #15): everything the CUDA path needs checked and measured, in one command that
ends within a time budget and writes one Markdown report.

    python benchmarks/gpu_check.py --out "$OUT/gpu_report.md"     # on a CUDA machine, about 3-5 minutes
    python benchmarks/gpu_check.py --budget 300                     # a shorter time budget (seconds)

The report (also printed) has, in order:

1. the environment: GPU, CUDA and cuDNN versions, torch, memory, TF32 settings;
2. the CUDA tests (``pytest -q -m cuda``, run as a subprocess): counts, skip reasons, failure tails;
3. CUDA against CPU in float32: ``MeanFieldCRF`` in eval mode (the fast path) and in training mode (autograd:
   the output and the gradients w.r.t. the logits and every CRF parameter), ``build_lattice`` (vertices and
   filter output), ``DenseCRF``, and a ``torch.compile``d network + CRF against eager (last, if time is left);
4. CRF timings on CUDA: inference, 10 iterations, at 513×513 (21 classes) and 1024×2048 (19 classes); training
   forward + backward, 5 iterations, 321×321, batch 10, 21 classes, bandwidths learned and fixed;
5. the CRF's share of a stage-2 step: ``train.py``'s optimiser step for ``deeplabv2_resnet101`` alone and with
   the CRF (autocast as train.py sets it; the CRF computes in float32), timed in interleaved pairs; then a
   batch of 2 with the MSC network;
6. the peak CUDA memory (``torch.cuda.max_memory_allocated``) of every row.

Each row runs in its own ``try``: an error is written into its row and the script goes on. A row starts only
when the time budget still leaves what it needs; later rows say "not run: time budget". A watchdog writes the
report and exits shortly after the budget even if a row never returns. Without a CUDA device the script writes
a one-line report and exits 0. Differences are ``max |cuda - cpu|`` and that divided by ``max |cpu|``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device: nothing measured"
NOT_RUN = "not run: time budget"
TOLERANCE = 1e-3  # max |cuda - cpu| / max |cpu| above which a comparison row says so
HARD_STOP_GRACE_S = 20.0  # the watchdog writes the report and exits this long after the budget
PYTEST_TIMEOUT_S = 150.0
NUM_CLASSES = 21
PYTEST_COUNTS = ("passed", "failed", "skipped", "errors", "deselected", "xfailed", "xpassed")


# ------------------------------------------------------------------------------------------------------------
# Pure helpers: time budget, repeats, formatting, pytest's summary


class Budget:
    """Seconds left of a time budget on ``clock`` (a fake clock in tests)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def remaining(self) -> float:
        return max(0.0, self.seconds - self.elapsed())

    def allows(self, needed: float) -> bool:
        """Whether at least ``needed`` seconds are left."""
        return self.remaining() >= needed


def repeats_within(seconds_per_call: float, seconds: float, *, lo: int, hi: int) -> int:
    """How many calls of ``seconds_per_call`` fit in ``seconds``, clamped to [lo, hi] (lo wins over hi)."""
    fit = int(seconds / seconds_per_call) if seconds_per_call > 0 else hi
    return max(lo, min(hi, fit))


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the values, 3 significant digits."""
    return f"{min(values):.3g}-{max(values):.3g}"


def format_cell(value: Any) -> str:
    """A Markdown table cell: None as '-', floats to 3 significant digits (scientific when small), text with
    its pipes escaped and its line breaks joined."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:.3g}" if value == 0 or 1e-2 <= abs(value) < 1e5 else f"{value:.2e}"
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` (mappings from column to value; a missing column is '-')."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def parse_pytest_summary(output: str) -> dict[str, int]:
    """The counts of pytest's last summary line (``== 2 passed, 1 skipped in 3.1s ==``), every key of
    ``PYTEST_COUNTS`` present (0 when absent)."""
    counts = dict.fromkeys(PYTEST_COUNTS, 0)
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error|deselected)"
                                                                  r"|no tests ran", line)]
    if summary:
        for number, word in re.findall(r"(\d+) (\w+)", summary[-1]):
            word = "errors" if word == "error" else word
            if word in counts:
                counts[word] = int(number)
    return counts


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------------------
# The report and the row runner


@dataclass
class Table:
    """One section of the report: a title, a note, and rows under fixed columns (the first names the row)."""

    title: str
    columns: list[str]
    note: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)

    def render(self) -> str:
        return "\n\n".join(part for part in (f"## {self.title}", self.note,
                                             markdown_table([*self.columns, "peak MiB", "status"], self.rows)) if part)


@dataclass
class Step:
    """A unit of work that fills rows of ``table``: ``run()`` returns them; ``needs_s``: the seconds of budget
    it must find left to start."""

    table: Table
    name: str
    run: Callable[[], list[dict[str, Any]]]
    needs_s: float


class Report:
    """The report's header, sections and error details, shared with the watchdog under ``lock``."""

    def __init__(self, header: list[str]) -> None:
        self.header = header
        self.tables: list[Table] = []
        self.details: list[str] = []
        self.log: list[dict[str, Any]] = []  # each step's wall time
        self.current: Step | None = None
        self.pending: list[Step] = []
        self.lock = threading.RLock()

    def table(self, title: str, columns: list[str], note: str = "") -> Table:
        self.tables.append(Table(title, columns, note))
        return self.tables[-1]

    def render(self) -> str:
        with self.lock:
            parts = ["\n".join(self.header), *(t.render() for t in self.tables)]
            if self.log:
                parts.append("## Steps (wall time)\n\n" + markdown_table(["step", "seconds", "outcome"], self.log))
            if self.details:
                parts.append("## Details\n\n" + "\n\n".join(self.details))
            return "\n\n".join(parts) + "\n"

    def stop_unfinished(self, reason: str) -> None:
        """Marks the step in progress with ``reason`` and every step not started as not run."""
        with self.lock:
            if self.current is not None:
                self.current.table.rows.append({self.current.table.columns[0]: self.current.name, "status": reason})
            for step in self.pending:
                step.table.rows.append({step.table.columns[0]: step.name, "status": NOT_RUN})
            self.current, self.pending = None, []


def run_steps(steps: list[Step], budget: Budget, report: Report, device: torch.device) -> None:
    """Runs each step that the budget allows, each in its own ``try``; its rows get the step's peak CUDA memory
    and an ``ok`` status unless they say otherwise."""
    for i, step in enumerate(steps):
        with report.lock:
            report.current, report.pending = step, steps[i + 1:]
        first, start = step.table.columns[0], time.perf_counter()
        if not budget.allows(step.needs_s):
            rows = [{first: step.name, "status": NOT_RUN}]
        else:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                rows = step.run()
                synchronize(device)
            except Exception as e:  # noqa: BLE001 — every failure is a finding: record it, go on
                message = f"{type(e).__name__}: {e}"
                rows = [{first: step.name, "status": f"error: {message[:300]}"}]
                report.details.append(f"### {step.table.title}: {step.name}\n\n```\n"
                                      f"{tail(traceback.format_exc(), 25)}\n```")
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            for row in rows:
                row.setdefault("peak MiB", peak)
                row.setdefault("status", "ok")
            gc.collect()
        outcome = "ok" if all(row["status"] == "ok" for row in rows) else rows[0]["status"]
        with report.lock:
            step.table.rows.extend(rows)
            report.log.append({"step": step.name, "seconds": time.perf_counter() - start, "outcome": outcome})
            report.current = None
    report.pending = []


def start_watchdog(report: Report, seconds: float, write: Callable[[str], None]) -> threading.Timer:
    """After ``seconds``, writes the report as it stands and ends the process (a row that never returns)."""

    def stop() -> None:
        report.stop_unfinished(f"not finished: stopped at the hard time limit ({seconds:.0f} s)")
        write(report.render())
        os._exit(0)

    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    return timer


# ------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class Sizes:
    """The problem sizes of a run: the real ones on a GPU, tiny ones for ``--smoke``."""

    check: tuple[int, int, int, int]  # B, C, H, W of the CUDA-vs-CPU CRF comparisons
    lattice: tuple[int, int, int, int]  # B, d, H, W of random lattice features
    inference: tuple[tuple[int, int, int], ...]  # (H, W, C) of the inference timings
    train: tuple[int, int, int, int]  # B, C, H, W of the CRF training timings
    network: str  # the stage-2 network
    network_options: dict[str, Any]
    crop: int  # training crop (square)
    batch: int
    msc_network: str
    msc_batch: int
    compile_backend: str
    pytest_paths: tuple[str, ...]  # what the CUDA tests' pytest collects (all of testpaths when empty)
    warmup: int  # calls before timing
    max_repeats: int


FULL = Sizes(check=(2, 5, 64, 80), lattice=(2, 5, 120, 160), inference=((513, 513, 21), (1024, 2048, 19)),
             train=(10, 21, 321, 321), network="deeplabv2_resnet101", network_options={}, crop=321, batch=10,
             msc_network="deeplabv2_resnet101_msc", msc_batch=2, compile_backend="inductor", pytest_paths=(),
             warmup=2, max_repeats=10)
SMOKE = Sizes(check=(2, 3, 33, 41), lattice=(2, 5, 33, 41), inference=((33, 41, 3), (41, 33, 4)),
              train=(2, 3, 33, 41), network="deeplabv2_resnet18", network_options={"base_width": 8}, crop=33,
              batch=2, msc_network="deeplabv2_resnet18_msc", msc_batch=2, compile_backend="eager",
              pytest_paths=("tests/crf/test_lattice.py",), warmup=1, max_repeats=1)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    budget: Budget


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str):
    """A sibling benchmark script as a module (``bench_crf``: scenes and timers; ``bench_train``: train.py)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module(name)


def train_module():
    return sys.modules.get("train") or bench("bench_train").import_train()


def sample_times(fn: Callable[[], Any], ctx: Context) -> list[float]:
    """Seconds of calls of ``fn`` (which synchronises) after the warm-up calls; as many as fit in 15 s or a
    tenth of the budget left (at least 3, at most ``max_repeats``)."""
    start = time.perf_counter()
    for _ in range(ctx.sizes.warmup):
        fn()
    per_call = (time.perf_counter() - start) / max(1, ctx.sizes.warmup)
    n = repeats_within(per_call, min(15.0, ctx.budget.remaining() / 10), lo=min(3, ctx.sizes.max_repeats),
                       hi=ctx.sizes.max_repeats)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def max_diffs(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """``(max |ours - reference|, that / max |reference|)`` in float64, on the CPU."""
    ours, reference = ours.detach().double().cpu(), reference.detach().double().cpu()
    if ours.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(ours.shape)} vs {tuple(reference.shape)}")
    diff = (ours - reference).abs().max().item() if ours.numel() else 0.0
    scale = reference.abs().max().item() if reference.numel() else 0.0
    return diff, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def comparison(what: str, ours: torch.Tensor, reference: torch.Tensor, detail: str = "") -> dict[str, Any]:
    diff, rel = max_diffs(ours, reference)
    return {"check": what, "max abs diff": diff, "max rel diff": rel, "detail": detail,
            "status": "ok" if rel <= TOLERANCE else f"differs by more than {TOLERANCE:g}"}


def crf_inputs(b: int, c: int, h: int, w: int, kind: str = "synthetic") -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` scenes of ``bench_crf``: logits Tensor[B, C, H, W] and raw RGB Tensor[B, 3, H, W] (float32, CPU)."""
    scene = bench("bench_crf").scene
    pairs = [scene(h, w, c, seed=i, kind=kind) for i in range(b)]
    logits = torch.stack([torch.from_numpy(z) for _, z in pairs])
    image = torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im, _ in pairs]).float()
    return logits, image


# ------------------------------------------------------------------------------------------------------------
# The rows


def environment_rows(ctx: Context) -> list[dict[str, Any]]:
    rows = {"torch": torch.__version__, "python": platform.python_version(), "device": str(ctx.device)}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        rows.update({
            "GPU": torch.cuda.get_device_name(ctx.device),
            "compute capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "total memory GiB": props.total_memory / 2**30,
            "CUDA (torch build)": torch.version.cuda,
            "cuDNN": torch.backends.cudnn.version(),
            "bfloat16 supported": torch.cuda.is_bf16_supported(),
            "TF32 matmul / cuDNN": f"{torch.backends.cuda.matmul.allow_tf32} / {torch.backends.cudnn.allow_tf32}",
        })
    else:
        rows["CPU threads"] = torch.get_num_threads()
    try:  # a missing dependency fails most rows: say so first
        rows["crfrnn_deeplab"] = importlib.import_module("crfrnn_deeplab").__version__
    except ImportError as e:
        rows["crfrnn_deeplab"] = f"not importable: {e}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    rows["git commit"] = commit or "unknown (no git checkout)"
    return [{"item": k, "value": v} for k, v in rows.items()]


def pytest_rows(ctx: Context, report: Report) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", *ctx.sizes.pytest_paths]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    timeout = max(10.0, min(PYTEST_TIMEOUT_S, ctx.budget.remaining() - 60))
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, code, status = done.stdout + done.stderr, done.returncode, None
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        code, status = None, f"timed out after {timeout:.0f} s"
    counts = parse_pytest_summary(output)
    skips = [line for line in output.splitlines() if line.startswith("SKIPPED")]
    if skips:
        report.details.append("### CUDA tests: skipped\n\n```\n" + "\n".join(skips[:20]) + "\n```")
    if status or counts["failed"] or counts["errors"] or code not in (0, 5):
        report.details.append(f"### CUDA tests: output tail (exit code {code})\n\n```\n{tail(output, 60)}\n```")
        status = status or f"failures (exit code {code})"
    return [{"command": " ".join(cmd[2:]), **counts, "exit code": code, "seconds": time.perf_counter() - start,
             "status": status or "ok"}]


def crf_eval_rows(ctx: Context) -> list[dict[str, Any]]:
    from crfrnn_deeplab import MeanFieldCRF

    b, c, h, w = ctx.sizes.check
    logits, image = crf_inputs(b, c, h, w)
    mask = torch.ones(b, h, w, dtype=torch.bool)
    mask[-1, :, w - w // 4:] = False  # a padded image
    rows = []
    for normalization in ("symmetric", "after"):
        crf = MeanFieldCRF(num_classes=c, normalization=normalization).eval()
        with torch.no_grad():
            cpu = crf(logits, image, mask)
            ours = crf.to(ctx.device)(logits.to(ctx.device), image.to(ctx.device), mask.to(ctx.device))
        rows.append(comparison(f"eval (fast path), {normalization}", ours, cpu, f"{b}×{c}×{h}×{w}, padded mask"))
    return rows


def crf_train_rows(ctx: Context) -> list[dict[str, Any]]:
    from crfrnn_deeplab import MeanFieldCRF

    b, c, h, w = ctx.sizes.check
    logits, image = crf_inputs(b, c, h, w)
    weights = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0))
    results = []
    for device in (torch.device("cpu"), ctx.device):  # the CPU reference, then ours
        # bandwidths of the small image's scale, so that their gradients are not vanishingly small
        crf = MeanFieldCRF(num_classes=c, theta_alpha=20.0, theta_beta=30.0).train().to(device)
        z = logits.to(device).requires_grad_(True)
        out = crf(z, image.to(device))
        (out * weights.to(device)).sum().backward()
        results.append((out, z.grad, {name: p.grad for name, p in crf.named_parameters()}))
    (out_cpu, gz_cpu, gp_cpu), (out, gz, gp) = results
    shape = f"{b}×{c}×{h}×{w}, 5 iterations"
    rows = [comparison("train (autograd): output", out, out_cpu, shape),
            comparison("train: d loss / d logits", gz, gz_cpu, shape)]
    rows += [comparison(f"train: d loss / d {name}", gp[name], gp_cpu[name], shape) for name in gp_cpu]
    return rows


def lattice_rows(ctx: Context) -> list[dict[str, Any]]:
    from crfrnn_deeplab.crf import build_kernels, build_lattice

    rows = []
    b, d, h, w = ctx.sizes.lattice
    g = torch.Generator().manual_seed(0)
    features = torch.randn(b, d, h, w, generator=g) * 2
    values = torch.rand(b, h * w, 6, generator=g)
    cpu, ours = build_lattice(features), build_lattice(features.to(ctx.device))
    row = comparison("build_lattice, random features", ours.filter(values.to(ctx.device)), cpu.filter(values),
                     f"B={b}, d={d}, N={h * w}; vertices {ours.num_vertices} (CPU {cpu.num_vertices})")
    if ours.num_vertices != cpu.num_vertices:
        row["status"] = "vertex counts differ"
    rows.append(row)
    for kind in ("synthetic", "noise"):
        _, image = crf_inputs(2, 2, *ctx.sizes.check[2:], kind=kind)
        q = torch.rand(2, *ctx.sizes.check[2:], 4, generator=g)
        bandwidths = {name: torch.tensor(v) for name, v in (("theta_alpha", 80.0), ("theta_beta", 13.0),
                                                             ("theta_gamma", 3.0))}
        cpu_k = build_kernels(image, **bandwidths)
        our_k = build_kernels(image.to(ctx.device), **{k: v.to(ctx.device) for k, v in bandwidths.items()})
        row = comparison(f"bilateral kernel of a {kind} image", our_k.bilateral(q.to(ctx.device)), cpu_k.bilateral(q),
                         f"vertices {our_k.lattice.num_vertices} (CPU {cpu_k.lattice.num_vertices})")
        if our_k.lattice.num_vertices != cpu_k.lattice.num_vertices:
            row["status"] = "vertex counts differ"
        rows.append(row)
    return rows


def dense_crf_rows(ctx: Context) -> list[dict[str, Any]]:
    from crfrnn_deeplab import DenseCRF

    _, c, h, w = ctx.sizes.check
    logits, image = crf_inputs(1, c, h, w)
    probabilities = torch.softmax(logits[0], 0).numpy()
    rgb = image[0].permute(1, 2, 0).to(torch.uint8).numpy()
    cpu = DenseCRF(device="cpu")(rgb, probabilities)
    ours = DenseCRF(device=ctx.device)(rgb, probabilities)
    return [comparison("DenseCRF (numpy in and out)", torch.from_numpy(ours), torch.from_numpy(cpu),
                       f"{c}×{h}×{w}, 10 iterations")]


def inference_rows(ctx: Context, h: int, w: int, c: int) -> list[dict[str, Any]]:
    bench_crf = bench("bench_crf")
    image, logits = bench_crf.scene(h, w, c)
    device = ctx.device.type
    t10 = sample_times(bench_crf.ours_inference(image, logits, 10, device), ctx)
    t0 = sample_times(bench_crf.ours_inference(image, logits, 0, device), ctx)
    ms10, ms0 = statistics.median(t10) * 1e3, statistics.median(t0) * 1e3
    return [{"what": f"inference {h}×{w}, {c} classes, 10 iterations", "ms": ms10,
             "spread ms": spread([t * 1e3 for t in t10]), "repeats": len(t10),
             "detail": f"{(ms10 - ms0) / 10:.3g} ms / iteration; kernels (0 iterations) {ms0:.3g} ms"}]


def crf_training_rows(ctx: Context, *, learn_bandwidths: bool) -> list[dict[str, Any]]:
    from crfrnn_deeplab import MeanFieldCRF

    b, c, h, w = ctx.sizes.train
    logits, image = crf_inputs(b, c, h, w)
    crf = MeanFieldCRF(num_classes=c, train_iterations=5, learn_bandwidths=learn_bandwidths).train().to(ctx.device)
    z, im = logits.to(ctx.device).requires_grad_(True), image.to(ctx.device)

    def step() -> None:
        crf.zero_grad()
        z.grad = None
        crf(z, im).square().mean().backward()
        synchronize(ctx.device)

    times = sample_times(step, ctx)
    learned = "learned" if learn_bandwidths else "fixed"
    return [{"what": f"training fwd+bwd {h}×{w}, batch {b}, {c} classes, 5 iterations, bandwidths {learned}",
             "ms": statistics.median(times) * 1e3, "spread ms": spread([t * 1e3 for t in times]),
             "repeats": len(times)}]


def training_step_rows(ctx: Context, network_name: str, batch: int) -> list[dict[str, Any]]:
    """train.py's optimiser step for the network alone and for network + CRF, timed in interleaved pairs."""
    from crfrnn_deeplab import CRFRNN
    from crfrnn_deeplab.training.config import config_from_dict

    train, bench_crf = train_module(), bench("bench_crf")
    device, sizes = ctx.device, ctx.sizes
    cfg = config_from_dict({
        "model": {"name": network_name, "num_classes": NUM_CLASSES, "options": dict(sizes.network_options)},
        "amp": True,
        # a randomly initialised network with frozen BatchNorm diverges at real learning rates; the cost of a
        # step does not depend on the rate's value
        "stage2": {"batch_size": batch, "lr": 1e-12, "crf_lr": 1e-12},
    })
    network = train.build_network(cfg).to(device)
    models = {"network": network, "network + CRF": CRFRNN(network=network, crf=train.build_crf(cfg)).to(device)}
    data = bench("bench_train").batch_of(sizes.crop, batch, NUM_CLASSES, network)
    dtype = train.autocast_dtype(cfg, device)
    stop = train.StopRequest()
    steps = {}
    for name, model in models.items():
        optimizer = train.build_optimizer(model.train(), cfg.stage2)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def step(model=model, optimizer=optimizer, scaler=scaler) -> None:
            train.optimizer_step(model, optimizer, scaler, [data], stage=cfg.stage2, device=device, dtype=dtype,
                                 stop=stop)
            synchronize(device)

        steps[name] = step
    peaks, first = {}, 0.0
    for name, step in steps.items():  # one step each: the first call's set-up, and each model's own peak
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        first += time.perf_counter() - start
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    pairs = repeats_within(first, min(60.0, ctx.budget.remaining() / 6), lo=min(3, sizes.max_repeats),
                           hi=sizes.max_repeats)
    t_net, t_both, ratios = bench_crf.timed_pairs(steps["network"], steps["network + CRF"], pairs, warmup=1)
    shares = [100 * (1 - 1 / r) for r in ratios]
    where = f"{network_name} {sizes.crop}×{sizes.crop}, batch {batch}, autocast {dtype}"
    return [
        {"what": f"{where}: network", "ms": t_net * 1e3, "pairs": pairs, "peak MiB": peaks["network"]},
        {"what": f"{where}: network + CRF (5 iterations, float32)", "ms": t_both * 1e3, "pairs": pairs,
         "CRF share %": statistics.median(shares), "share spread %": spread(shares),
         "peak MiB": peaks["network + CRF"]},
    ]


def compile_rows(ctx: Context) -> list[dict[str, Any]]:
    from crfrnn_deeplab import CRFRNN, MeanFieldCRF, get_model

    sizes, device = ctx.sizes, ctx.device
    network = get_model(sizes.network, num_classes=NUM_CLASSES, **sizes.network_options)
    model = CRFRNN(network=network, crf=MeanFieldCRF(num_classes=NUM_CLASSES)).to(device).eval()
    raw = torch.rand(2, 3, sizes.crop, sizes.crop, generator=torch.Generator().manual_seed(0)).mul(255).to(device)
    x = model.preprocess(raw)
    compiled = torch.compile(model, backend=sizes.compile_backend)

    def call(m) -> Callable[[], Any]:
        def fn():
            with torch.no_grad():
                out = m(x, raw)
            synchronize(device)
            return out
        return fn

    eager_fn, compiled_fn = call(model), call(compiled)
    eager = eager_fn()
    start = time.perf_counter()
    ours = compiled_fn()
    compile_s = time.perf_counter() - start
    t_eager, t_compiled, _ = bench("bench_crf").timed_pairs(eager_fn, compiled_fn, min(3, sizes.max_repeats), warmup=1)
    detail = (f"backend {sizes.compile_backend}, eval mode, batch 2, {sizes.crop}×{sizes.crop}; first call "
              f"{compile_s:.1f} s; eager {t_eager * 1e3:.3g} ms, compiled {t_compiled * 1e3:.3g} ms")
    return [comparison("torch.compile network + CRF vs eager: network logits", ours.network, eager.network, detail),
            comparison("torch.compile network + CRF vs eager: CRF logits", ours.crf, eager.crf, detail)]


def build_steps(ctx: Context, report: Report) -> list[Step]:
    """The report's sections and, in the order they run, the steps that fill them."""
    env = report.table("Environment", ["item", "value"])
    tests = report.table("CUDA tests", ["command", *PYTEST_COUNTS, "exit code", "seconds"])
    checks = report.table(
        f"CUDA against CPU (float32; rel = max abs diff / max |CPU|, flagged above {TOLERANCE:g})",
        ["check", "max abs diff", "max rel diff", "detail"])
    timings = report.table(f"CRF timings (synchronised; the median; warm-up calls: {ctx.sizes.warmup})",
                           ["what", "ms", "spread ms", "repeats", "detail"])
    stage2 = report.table(
        "The CRF's share of a stage-2 training step (train.py's optimiser step, interleaved pairs)",
        ["what", "ms", "pairs", "CRF share %", "share spread %"],
        note="CRF share: 1 - network ms / (network + CRF) ms, per pair; median and range over the pairs.")
    sizes = ctx.sizes
    steps = [
        Step(env, "environment", lambda: environment_rows(ctx), 0),
        Step(tests, "pytest -m cuda", lambda: pytest_rows(ctx, report), 30),
        Step(checks, "MeanFieldCRF eval", lambda: crf_eval_rows(ctx), 10),
        Step(checks, "MeanFieldCRF train", lambda: crf_train_rows(ctx), 10),
        Step(checks, "build_lattice", lambda: lattice_rows(ctx), 10),
        Step(checks, "DenseCRF", lambda: dense_crf_rows(ctx), 5),
    ]
    steps += [Step(timings, f"inference {h}×{w}, {c} classes", lambda h=h, w=w, c=c: inference_rows(ctx, h, w, c), 15)
              for h, w, c in sizes.inference]
    steps += [Step(timings, f"training, bandwidths {'learned' if learn else 'fixed'}",
                   lambda learn=learn: crf_training_rows(ctx, learn_bandwidths=learn), 20) for learn in (True, False)]
    steps += [
        Step(stage2, f"{sizes.network}, batch {sizes.batch}",
             lambda: training_step_rows(ctx, sizes.network, sizes.batch), 60),
        Step(stage2, f"{sizes.msc_network}, batch {sizes.msc_batch}",
             lambda: training_step_rows(ctx, sizes.msc_network, sizes.msc_batch), 45),
        Step(checks, "torch.compile network + CRF", lambda: compile_rows(ctx), 150),
    ]
    return steps


# ------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report to this file")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds the rows may take; later rows are reported as not run (default: 420)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: with --smoke, to test the logic
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny sizes, every row
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget:g}")
    if args.device != "cuda" and not args.smoke:
        parser.error("a device other than cuda is only for --smoke runs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:  # a plain checkout, the package not installed (as on a lent GPU machine)
        sys.path.append(str(ROOT))
    budget = Budget(args.budget)

    def write(text: str) -> None:
        print(text, end="", flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text, encoding="utf-8")

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [f"# GPU check ({started})", "", f"`{' '.join(['python', *sys.argv])}`; time budget {args.budget:g} s"]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        write("\n".join(header) + f"\n\n{NO_CUDA} (torch {torch.__version__}, CUDA build {torch.version.cuda}).\n")
        return 0
    if args.smoke:
        torch.set_num_threads(1)
        header.append(f"\nsmoke run on {device}: tiny sizes, the figures mean nothing")
    report = Report(header)
    ctx = Context(device, SMOKE if args.smoke else FULL, budget)
    steps = build_steps(ctx, report)
    watchdog = start_watchdog(report, args.budget + HARD_STOP_GRACE_S, write)
    run_steps(steps, budget, report, device)
    watchdog.cancel()
    report.header.append(f"\nfinished in {budget.elapsed():.0f} s")
    write(report.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
