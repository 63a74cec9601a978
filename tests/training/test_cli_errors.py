"""Hostile command lines for train.py and the converter: each gives one ``error:`` line naming the culprit, a
documented exit status (2 usage/config, 1 data/runtime), no traceback, and leaves what it must not touch
byte-identical on disk (docs/errors.md)."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crfrnn_deeplab.training.config import load_config, save_config
from crfrnn_deeplab.training.errors import UsageError
from crfrnn_deeplab.weights import load_checkpoint
from crfrnn_deeplab.weights.convert import main as convert_main
from train_script import import_train

ROOT = Path(__file__).resolve().parents[2]


train = import_train()

# The smallest run that exercises the whole pipeline: 33-pixel images, a 4-wide ResNet-18, 2 steps.
TINY = [
    "data.image_size=33", "data.crop_size=33", "data.train_images=8", "data.val_images=2",
    "model.options.base_width=4", "crf.train_iterations=1", "crf.eval_iterations=1",
    "stage1.batch_size=2", "stage2.batch_size=2", "stage1.iterations=2", "stage2.iterations=0",
    "stage1.eval_every=0", "stage1.checkpoint_every=1", "stage2.checkpoint_every=1", "grid_search.enabled=false",
    "eval.panels=0", "eval.max_images=2", "eval.batch_size=2", "log_every=1", "threads=2",
]
VOC = ["data.dataset=voc12", "model.num_classes=21"]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values() if t.is_floating_point())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Shared artefacts: a finished tiny run, an interrupted one (step 1 of 2), a VOC tree, odd files."""
    base = tmp_path_factory.mktemp("shared")
    assert train.main(TINY + [f"out_dir={base / 'done'}"]) == 0
    assert train.main(TINY + [f"out_dir={base / 'paused'}", "--stop-after", "1"]) == 0
    (base / "notes.txt").write_text("not a checkpoint\n")
    torch.save({}, base / "empty.pt")
    torch.save({"conv.weight": torch.zeros(1)}, base / "state_dict.pt")
    return base


def voc_tree(root: Path, *, train_ids=("a", "b", "c"), val_ids=("v",), size=(33, 33)) -> Path:
    """A minimal VOC2012 tree (images 33x33, labels of class 0/1) under ``root``."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
            Image.fromarray((rng.random(size) > 0.5).astype(np.uint8)).save(root / "SegmentationClass" / f"{i}.png")
    return root


@dataclasses.dataclass
class Case:
    """``build(tmp, shared) -> (args, fragments, protected paths)``; the run must exit ``status``."""

    name: str
    status: int
    build: Callable[[Path, Path], tuple[list[str], list[str], list[Path]]]
    cli: str = "train"


def made(path: Path, text: str | None = None) -> Path:
    """``path`` created: a directory, or a file holding ``text``."""
    path.mkdir() if text is None else path.write_text(text)
    return path


def c(name, status, build, cli="train"):
    return pytest.param(Case(name, status, build, cli), id=name)


def _previous_run(tmp, shared):
    out = tmp / "run"
    shutil.copytree(shared / "done", out)
    return out


def _bad_val_label(tmp, shared, check=True):
    root = voc_tree(tmp / "voc")
    Image.fromarray(np.zeros((20, 33), np.uint8)).save(root / "SegmentationClass" / "v.png")
    args = TINY + VOC + [f"data.root={root}", f"out_dir={tmp / 'run'}", "stage1.batch_size=1"]
    return args + ([] if check else ["data.check_files=false"])


def _failed_resume(tmp, shared):
    out = tmp / "run"
    shutil.copytree(shared / "paused", out)
    return ["--resume", str(out), "model.options.base_width=8"], [f"{out / 'stage1' / 'last.pt'}",
                                                                  "cannot resume"], [out]


def _truncated(tmp, shared):
    out = tmp / "run"
    shutil.copytree(shared / "paused", out)
    last = out / "stage1" / "last.pt"
    last.write_bytes(last.read_bytes()[:5000])
    return ["--resume", str(out)], [str(last), "truncated"], [out]


def _dst_exists(tmp, shared):
    (tmp / "out.pt").write_bytes(b"keep me")
    return [str(shared / "state_dict.pt"), str(tmp / "out.pt")], ["destination exists", "--overwrite",
                                                                  str(tmp / "out.pt")], [tmp / "out.pt"]


def _copy(shared, name, to):
    shutil.copytree(shared / name, to)
    return to


def _resume_elsewhere(tmp, shared):
    run, other = _copy(shared, "paused", tmp / "run"), _copy(shared, "done", tmp / "other")
    return (["--resume", str(run), f"out_dir={other}"],
            [f"--resume continues the run in {run}", f"out_dir={other}"], [run, other])


def _resume_and_overwrite(tmp, shared):
    run = _copy(shared, "paused", tmp / "run")
    return ["--resume", str(run), "--overwrite"], ["--resume and --overwrite contradict each other"], [run]


def _overwrite_deletes_init_from(tmp, shared):
    run = _copy(shared, "done", tmp / "run")
    weights = run / "stage1" / "last.pt"
    return (TINY + [f"out_dir={run}", f"model.init_from={weights}", "--overwrite"],
            [f"--overwrite would delete model.init_from={weights}", str(run / "stage1")], [run])


def _resume_loose_checkpoint(tmp, shared):
    folder = made(tmp / "weights")
    shutil.copy(shared / "paused" / "stage1" / "last.pt", folder / "mine.pt")
    (folder / "results.md").write_text("my notes")
    return (["--resume", str(folder / "mine.pt")],
            ["not in a run's stage1/ or stage2/ folder", f"model.init_from={folder / 'mine.pt'}"], [folder])


def _resume_into_a_foreign_folder(tmp, shared):
    folder = made(tmp / "project")
    (folder / "config.yaml").write_text("mine: 1\n")
    made(folder / "stage1")
    shutil.copy(shared / "paused" / "stage1" / "last.pt", folder / "stage1" / "last.pt")
    return (["--resume", str(folder)], [f"{folder} is not a run directory", "not written by train.py"], [folder])


def _resume_another_runs_checkpoint(tmp, shared):
    # the run's own config.yaml names another seed than the checkpoint put in its stage1/ (a file copied over)
    run = _copy(shared, "paused", tmp / "run")
    other = dataclasses.replace(load_config(run / "config.yaml"), seed=12345)
    save_config(other, run / "config.yaml")
    return (["--resume", str(run)], [f"{run / 'stage1' / 'last.pt'} was written by another run", "seed differ"],
            [run])


def _edited_checkpoint(entry, value, fragment):
    def build(tmp, shared):
        run = _copy(shared, "paused", tmp / "run")
        last = run / "stage1" / "last.pt"
        checkpoint = torch.load(last, weights_only=True)
        checkpoint[entry] = value
        torch.save(checkpoint, last)
        return ["--resume", str(run)], [str(last), fragment], [run]
    return build


def _edited_config(section, key, value, fragment, *, eval_only=False):
    """A copy of the paused run whose checkpoint's saved config holds ``section.key = value``; resumed, or
    evaluated with ``--eval-only``. The error must name the checkpoint as the source of the value."""
    def build(tmp, shared):
        run = _copy(shared, "paused", tmp / "run")
        last = run / "stage1" / "last.pt"
        checkpoint = torch.load(last, weights_only=True)
        if section:
            checkpoint["config"][section][key] = value
        else:
            checkpoint["config"][key] = value
        torch.save(checkpoint, last)
        args = ["--eval-only", str(last), f"out_dir={tmp / 'eval'}"] if eval_only else ["--resume", str(run)]
        return args, [f"{last} (its config): {fragment}"], [run]
    return build


def _appended_to_metrics(line):
    """A copy of the paused run whose metrics.jsonl holds ``line`` (edited by hand), before its last record."""
    def build(tmp, shared):
        run = _copy(shared, "paused", tmp / "run")
        kept = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        text = "".join(kept[:-1]) + line + "\n" + kept[-1]
        (run / "metrics.jsonl").write_bytes(text.encode("utf-8", "surrogateescape"))  # ("\udcff": the byte 0xff)
        fragments = [f"{run / 'metrics.jsonl'}, line {len(kept)}: ", "fix or delete that line"]
        return ["--resume", str(run)], fragments, [run]
    return build


def _run_file_of_the_wrong_kind(name, folder):
    """A copy of the paused run whose ``name`` is a folder (``folder``) or a file in place of the run's own."""
    def build(tmp, shared):
        run = _copy(shared, "paused", tmp / "run")
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        made(path, None if folder else "x")
        found = "a folder" if folder else "not a folder"
        return ["--resume", str(run), "stage1.lr=1e-3"], [f"--resume: {path} is {found}", "move it out of the way"], [run]
    return build


CASES = [
    # ---- usage and config: exit 2, nothing written
    c("unknown-key", 2, lambda t, s: (TINY + ["stage1.lrr=1", f"out_dir={t / 'r'}"], ["unknown config key 'stage1.lrr'"], [])),
    c("unknown-section-key", 2, lambda t, s: (["model.nope=1"], ["unknown config key 'model.nope'"], [])),
    c("nan-lr", 2, lambda t, s: (["stage1.lr=nan"], ["stage1.lr must be a finite number, got nan"], [])),
    c("inf-crf-lr", 2, lambda t, s: (["stage2.crf_lr=inf"], ["stage2.crf_lr must be a finite number"], [])),
    c("nan-in-list", 2, lambda t, s: (["data.scale_range=[0.5,.nan]"], ["data.scale_range[1] must be a finite number"], [])),
    c("wrong-type", 2, lambda t, s: (["stage1.iterations=ten"], ["stage1.iterations: expected int, got str 'ten'"], [])),
    c("negative-lr", 2, lambda t, s: (["stage1.lr=-1"], ["stage1.lr must be >= 0, got -1"], [])),
    c("zero-bandwidth", 2, lambda t, s: (["crf.theta_gamma=0"], ["crf.theta_gamma must be > 0, got 0"], [])),
    c("probability-range", 2, lambda t, s: (["data.hflip_prob=2"], ["data.hflip_prob must be in [0, 1], got 2"], [])),
    c("seed-range", 2, lambda t, s: (["seed=-1"], ["seed must be in [0, 4294967295], got -1"], [])),
    c("divergence-factor-below-1", 2, lambda t, s: (["divergence_factor=0.5"], ["divergence_factor must be 0 (off) or > 1, got 0.5"], [])),
    c("divergence-factor-negative", 2, lambda t, s: (["divergence_factor=-1"], ["divergence_factor must be >= 0, got -1"], [])),
    c("unknown-dataset", 2, lambda t, s: (["data.dataset=nope"], ["data.dataset: expected one of", "got 'nope'"], [])),
    c("unknown-model", 2, lambda t, s: (["model.name=nope"], ["model.name: expected one of", "got 'nope'"], [])),
    c("unknown-model-option", 2, lambda t, s: (["model.options.nope=1"], ["model.options: ['nope'] not options of"], [])),
    c("bad-normalization", 2, lambda t, s: (["crf.normalization=bad"], ["crf.normalization: expected one of", "'bad'"], [])),
    c("bad-eval-mode", 2, lambda t, s: (["eval.mode=tiles"], ["eval.mode: expected one of", "'tiles'"], [])),
    c("section-given-a-value", 2, lambda t, s: (["stage1=5"], ["stage1"], [])),
    c("not-key-value", 2, lambda t, s: (["stage1.lr"], ["override 'stage1.lr' is not key=value"], [])),
    c("nothing-to-train", 2, lambda t, s: (["stage1.iterations=0", "stage2.iterations=0"], ["nothing to train"], [])),
    c("empty-grid", 2, lambda t, s: (["grid_search.theta_alphas=[]"], ["grid_search.theta_alphas must be a non-empty list"], [])),
    c("device-unknown", 2, lambda t, s: (["device=tpu"], ["device: expected auto, cpu, cuda or cuda:N, got 'tpu'"], [])),
    c("device-cuda-index", 2, lambda t, s: (["device=cuda:99"], ["device=cuda:99"], [])),
    c("root-required", 2, lambda t, s: (VOC, ["data.root is required for dataset 'voc12'"], [])),
    c("config-missing", 2, lambda t, s: (["--config", str(t / "nope.yaml")], [f"config file not found: {t / 'nope.yaml'}"], [])),
    c("config-not-yaml", 2, lambda t, s: (["--config", str(made(t / "bad.yaml", "a: [1, 2\n"))],
                                          [f"{t / 'bad.yaml'}: not valid YAML"], [t / "bad.yaml"])),
    c("config-not-mapping", 2, lambda t, s: (["--config", str(made(t / "list.yaml", "- 1\n"))],
                                             [str(t / "list.yaml")], [t / "list.yaml"])),
    c("config-a-text", 2, lambda t, s: (["--config", str(made(t / "text.yaml", "hello\n"))],  # was "unknown config key"
                                        [f"{t / 'text.yaml'}: cannot be read as a config, a YAML mapping of config "
                                         f"keys", "its top level is str 'hello'"], [t / "text.yaml"])),
    c("config-not-text", 2, lambda t, s: (["--config", str(s / "empty.pt")],  # was a UnicodeDecodeError traceback
                                          [f"{s / 'empty.pt'}: cannot be read as a config", "not UTF-8 text"], [s])),
    c("config-interpolation-of-the-wrong-shape", 2, lambda t, s: (["crf=${seed}"],  # was "config: Invalid type ..."
                                                                  ["crf: expected a mapping of spatial_weight,",
                                                                   "got int 0 (the value of ${seed})"], [])),
    c("index-past-the-end", 2, lambda t, s: (["data.scale_range[2]=1"],
                                             ["data.scale_range[2]: index 2 is out of range: data.scale_range has 2 "
                                              "items"], [])),
    c("index-of-no-list", 2, lambda t, s: (["seed[0]=1"], ["seed[0]: seed is int, not a list"], [])),
    c("init-from-missing", 2, lambda t, s: (TINY + [f"model.init_from={t / 'w.pt'}", f"out_dir={t / 'r'}"],
                                            [f"model.init_from: no such file ({t / 'w.pt'})"], [])),
    c("out-dir-is-a-file", 2, lambda t, s: (TINY + [f"out_dir={made(t / 'f', 'x')}"],
                                            [f"out_dir is a file, not a directory (out_dir={t / 'f'})"], [t / "f"])),
    c("out-dir-holds-a-run", 2, lambda t, s: (TINY + [f"out_dir={_previous_run(t, s)}"],
                                              ["out_dir already holds files", "config.yaml", "--overwrite",
                                               f"--resume {t / 'run'}"], [t / "run"])),
    c("out-dir-holds-other-files", 2, lambda t, s: (TINY + [f"out_dir={made(made(t / 'o') / 'keep.txt', 'x').parent}"],
                                                    ["out_dir already holds files (keep.txt)"], [t / "o"])),
    c("batch-larger-than-dataset", 2, lambda t, s: (TINY + ["stage1.batch_size=16", f"out_dir={t / 'r'}"],
                                                    ["stage1.batch_size=16 is larger than the training split (8 images"],
                                                    [])),
    c("resume-nonexistent", 2, lambda t, s: (["--resume", str(t / "nope")], [f"nothing to resume in {t / 'nope'}"], [])),
    c("resume-empty-dir", 2, lambda t, s: (["--resume", str(made(t / "e"))], [f"nothing to resume in {t / 'e'}"],
                                           [t / "e"])),
    c("resume-with-another-out-dir", 2, _resume_elsewhere),
    c("resume-with-overwrite", 2, _resume_and_overwrite),
    c("overwrite-would-delete-init-from", 2, _overwrite_deletes_init_from),
    c("resume-a-checkpoint-outside-a-run", 2, _resume_loose_checkpoint),
    c("resume-into-a-folder-no-run-wrote", 2, _resume_into_a_foreign_folder),
    c("resume-another-runs-checkpoint", 2, _resume_another_runs_checkpoint),
    c("stop-after-zero", 2, lambda t, s: (TINY + [f"out_dir={t / 'r'}", "--stop-after", "0"],
                                          ["--stop-after must be >= 1", "got 0"], [])),
    c("out-dir-below-a-file", 2, lambda t, s: (TINY + [f"out_dir={made(t / 'f', 'x') / 'run'}"],
                                               [f"out_dir lies below a file, {t / 'f'}"], [t / "f"])),
    c("model-option-bad-value", 2, lambda t, s: (TINY + ["model.options.norm=foo", f"out_dir={t / 'r'}"],
                                                 ["model.options of 'deeplabv2_resnet18': norm must be one of"], [])),
    c("sliding-stride-beyond-window", 2, lambda t, s: (TINY + ["eval.mode=sliding", "eval.window=16",
                                                               "eval.stride=17", f"out_dir={t / 'r'}"],
                                                       ["eval.stride=17 must be <= eval.window=16"], [])),
    c("synthetic-image-too-small", 2, lambda t, s: (TINY + ["data.image_size=20", "data.crop_size=20",
                                                            f"out_dir={t / 'r'}"],
                                                    ["synthetic images must be at least 32x32", "data.image_size=20"],
                                                    [])),
    # a bad value saved in a checkpoint's config: the checkpoint is named as where it comes from
    c("resume-checkpoint-config-nan-lr", 2,
      _edited_config("stage1", "lr", math.nan, "stage1.lr must be a finite number, got nan")),
    c("eval-only-checkpoint-config-nan-lr", 2,
      _edited_config("stage1", "lr", math.nan, "stage1.lr must be a finite number, got nan", eval_only=True)),
    c("resume-checkpoint-config-negative-lr", 2,
      _edited_config("stage1", "lr", -1.0, "stage1.lr must be >= 0, got -1")),
    c("resume-checkpoint-config-device-not-on-this-machine", 2,
      _edited_config(None, "device", "cuda:99", "device=cuda:99: ")),
    c("resume-took-an-override-for-the-run", 2, lambda t, s: (["--resume", "stage1.lr=1e-3"],
                                                            ["--resume stage1.lr=1e-3: no such run directory or "
                                                             "checkpoint; it reads as a KEY=VALUE override"], [])),
    # --eval-only trains nothing: --resume's run was silently ignored (and its out_dir override evaluated into)
    c("eval-only-with-resume", 2, lambda t, s: (["--eval-only", str(s / "done" / "stage1" / "last.pt"), "--resume",
                                                 str(_copy(s, "paused", t / "run")), f"out_dir={t / 'run'}"],
                                                ["--eval-only and --resume contradict each other"], [t / "run"])),
    c("eval-only-with-stop-after", 2, lambda t, s: (["--eval-only", str(s / "done" / "stage1" / "last.pt"),
                                                     f"out_dir={t / 'e'}", "--stop-after", "1"],
                                                    ["--eval-only and --stop-after contradict each other"], [])),
    # a run file of the wrong kind failed after config.yaml was rewritten ("[Errno 17] File exists: '.../tensorboard'")
    c("resume-tensorboard-is-a-file", 2, _run_file_of_the_wrong_kind("tensorboard", folder=False)),
    c("resume-metrics-is-a-folder", 2, _run_file_of_the_wrong_kind("metrics.jsonl", folder=True)),
    c("resume-stage2-is-a-file", 2, _run_file_of_the_wrong_kind("stage2", folder=False)),
    c("eval-only-missing", 2, lambda t, s: (["--eval-only", str(t / "x.pt")], [f"checkpoint not found: {t / 'x.pt'}"], [])),
    # ---- data and checkpoints: exit 1, nothing destroyed
    c("resume-truncated-last", 1, _truncated),
    c("resume-not-a-training-checkpoint", 1, lambda t, s: (["--resume", str(s / "state_dict.pt")],
                                                           ["not a checkpoint written by train.py",
                                                            f"model.init_from={s / 'state_dict.pt'}"], [s])),
    c("resume-text-file", 1, lambda t, s: (["--resume", str(s / "notes.txt")],
                                           [f"{s / 'notes.txt'} is not a readable PyTorch checkpoint"], [s])),
    c("resume-changed-model-fails-cleanly", 1, _failed_resume),
    c("resume-edited-data-position", 1, _edited_checkpoint("data", {"epoch": "x"}, "'data' entry")),
    c("resume-edited-rng", 1, _edited_checkpoint("rng", {"torch": torch.zeros(3, dtype=torch.uint8)}, "'rng' entry")),
    c("resume-edited-step", 1, _edited_checkpoint("step", "3", "'step' entry")),
    c("resume-edited-scheduler", 1, _edited_checkpoint("scheduler", {"nope": 1}, "cannot resume it")),
    # an edited metrics.jsonl: a traceback (AttributeError, TypeError), or the line dropped without a word
    c("resume-metrics-line-not-a-record", 1, _appended_to_metrics("5")),
    c("resume-metrics-line-with-a-text-stage", 1, _appended_to_metrics('{"kind": "train", "stage": "1", "step": 1}')),
    c("resume-metrics-line-not-json", 1, _appended_to_metrics("# my note")),
    c("resume-metrics-line-not-utf8", 1, _appended_to_metrics("\udcff")),
    c("eval-only-text-file", 1, lambda t, s: (["--eval-only", str(s / "notes.txt")],
                                              [f"{s / 'notes.txt'} is not a readable PyTorch checkpoint"], [s])),
    c("eval-only-empty-dict", 1, lambda t, s: (["--eval-only", str(s / "empty.pt"), f"out_dir={t / 'r'}"] + TINY,
                                               [str(s / "empty.pt")], [s])),
    c("data-root-not-a-directory", 1, lambda t, s: (TINY + VOC + [f"data.root={t / 'nope'}", f"out_dir={t / 'r'}"],
                                                    [f"data.root='{t / 'nope'}' is not a directory"], [])),
    c("voc-wrong-layout", 1, lambda t, s: (TINY + VOC + [f"data.root={made(t / 'voc')}", f"out_dir={t / 'r'}"],
                                           ["VOC directory 'JPEGImages'", "does not exist", "expected layout"], [t / "voc"])),
    c("voc-missing-val-label", 1, lambda t, s: ((voc_tree(t / "voc") / "SegmentationClass" / "v.png").unlink() or (
        TINY + VOC + [f"data.root={t / 'voc'}", f"out_dir={t / 'r'}", "stage1.batch_size=1"],
        ["1 of 1 labels listed in", "v.png"], [t / "voc"]))),
    c("voc-val-label-wrong-size", 1, lambda t, s: (_bad_val_label(t, s), ["size mismatch", "v.png", "is 20x33"],
                                                   [t / "voc"])),
    c("voc-val-label-not-an-image", 1, lambda t, s: (made(voc_tree(t / "voc") / "SegmentationClass" / "v.png", "x") and (
        TINY + VOC + [f"data.root={t / 'voc'}", f"out_dir={t / 'r'}", "stage1.batch_size=1"],
        ["label", "v.png", "is not a readable image"], [t / "voc"]))),
    c("voc-val-label-rgb", 1, lambda t, s: (Image.fromarray(np.zeros((33, 33, 3), np.uint8)).save(
        voc_tree(t / "voc") / "SegmentationClass" / "v.png") or (
        TINY + VOC + [f"data.root={t / 'voc'}", f"out_dir={t / 'r'}", "stage1.batch_size=1"],
        ["v.png", "is a 'RGB' image"], [t / "voc"]))),
    c("voc-bad-train-image", 1, lambda t, s: (made(voc_tree(t / "voc") / "JPEGImages" / "b.jpg", "broken") and (
        TINY + VOC + [f"data.root={t / 'voc'}", f"out_dir={t / 'r'}", "stage1.batch_size=1"],
        ["b.jpg"], [t / "voc"]))),
    c("voc-bad-train-label-values", 1, lambda t, s: (Image.fromarray(np.full((33, 33), 77, np.uint8)).save(
        voc_tree(t / "voc") / "SegmentationClass" / "a.png") or (
        TINY + VOC + [f"data.root={t / 'voc'}", f"out_dir={t / 'r'}", "stage1.batch_size=3"],
        ["a.png", "77"], [t / "voc"]))),
    # ---- the converter: exit 2, nothing written
    c("convert-missing-src", 2, lambda t, s: ([str(t / "absent.pth"), str(t / "o.pt")], [str(t / "absent.pth")], []), "convert"),
    c("convert-text-file", 2, lambda t, s: ([str(s / "notes.txt"), str(t / "o.pt")], [str(s / "notes.txt"), "not a readable"], [s]), "convert"),
    c("convert-empty-dict", 2, lambda t, s: ([str(s / "empty.pt"), str(t / "o.pt")], ["empty.pt is an empty dict"], [s]), "convert"),
    c("convert-dst-is-src", 2, lambda t, s: ([str(s / "state_dict.pt")] * 2, ["must differ"], [s]), "convert"),
    c("convert-dst-exists", 2, _dst_exists, "convert"),
    c("convert-dst-is-a-directory", 2, lambda t, s: ([str(s / "state_dict.pt"), str(made(t / "d"))],
                                                     [f"the destination is a directory ({t / 'd'})"], [s]), "convert"),
    c("convert-unknown-layout-keys", 2, lambda t, s: ([str(s / "state_dict.pt"), str(t / "o.pt")], [], [s]), "convert"),
]


@pytest.mark.parametrize("case", CASES)
def test_hostile_command_line(case: Case, work, tmp_path, capsys):
    args, fragments, protected = case.build(tmp_path, work)
    before = {p: snapshot(p) for p in protected}
    files_before = set(tmp_path.rglob("*"))
    status = (train.main if case.cli == "train" else convert_main)(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == case.status, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    for path, content in before.items():
        assert snapshot(path) == content, f"{path} changed"
    if case.status == 2:  # refused up front: nothing new on disk
        assert set(tmp_path.rglob("*")) == files_before
    if case.cli == "convert":
        assert not (tmp_path / "o.pt").exists()


# ---- the cases that run: overwrite, resume into a copy, metrics after a kill, divergence


def test_overwrite_replaces_the_previous_run_and_keeps_other_files(work, tmp_path):
    out = _previous_run(tmp_path, work)
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl").write_text('{"kind": "train", "stage": 1, "step": 99, "loss": 1.0}\n')
    assert train.main(TINY + [f"out_dir={out}", "--overwrite"]) == 0
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_writes_into_the_directory_it_was_given(work, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(work / "paused", original)
    before = snapshot(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert train.main(["--resume", str(copy)]) == 0
    assert snapshot(original) == before  # the out_dir recorded in the checkpoint is not touched
    assert load_checkpoint(copy / "stage1" / "last.pt")["step"] == 2
    assert (copy / "results.json").is_file()
    assert train.main(["--resume", str(copy / "stage1" / "last.pt"), "stage1.iterations=3"]) == 0
    assert load_checkpoint(copy / "stage1" / "last.pt")["step"] == 3


def test_resume_after_a_kill_does_not_repeat_metrics(work, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(work / "paused", out)
    with (out / "metrics.jsonl").open("a") as f:  # what a run killed after logging step 2 leaves behind
        f.write(json.dumps({"kind": "train", "stage": 1, "step": 2, "loss": 9.0}) + "\n" + '{"kind": "tr')
    assert train.main(["--resume", str(out)]) == 0
    steps = [r["step"] for r in records(out) if r["kind"] == "train"]
    assert steps == [1, 2] and 9.0 not in [r["loss"] for r in records(out) if r["kind"] == "train"]
    assert sum(r["kind"] == "final" for r in records(out)) == 1


def _diverging(tmp_path, capsys, overrides, *, key, sane=True):
    out = tmp_path / "run"
    rc = train.main(TINY + ["stage1.iterations=6", f"out_dir={out}"] + overrides)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err, err
    suggested = errors[0].rpartition(f"{key}=")[2].split()[0]
    assert math.isfinite(float(suggested)) and "=nan" not in errors[0], errors[0]
    for last in out.glob("stage*/last.pt"):
        assert finite(last)
        assert not sane or max(t.abs().max().item() for t in load_checkpoint(last)["model"].values()
                   if t.is_floating_point() and t.numel()) < 1e6
    return errors[0], float(suggested)


def test_nan_loss_stops_before_the_update_and_suggests_a_finite_lr(tmp_path, capsys):
    message, lr = _diverging(tmp_path, capsys, ["stage1.lr=1e30"], key="stage1.lr", sane=False)
    assert "not finite" in message and lr == pytest.approx(1e29)


def test_huge_lr_stops_on_the_loss_ratio_with_finite_weights(tmp_path, capsys):
    message, lr = _diverging(tmp_path, capsys, ["stage1.lr=1e6", "stage1.checkpoint_every=100"], key="stage1.lr")
    assert lr == pytest.approx(1e5) and "stage 1 (DeepLab v2)" in message


def test_huge_crf_lr_stops_with_a_finite_checkpoint(tmp_path, capsys):
    message, lr = _diverging(tmp_path, capsys, ["stage1.iterations=1", "stage2.iterations=4", "stage2.crf_lr=1e9",
                                                "stage2.lr=0"], key="stage2.crf_lr")
    assert "stage 2 (CRF-as-RNN)" in message and lr == pytest.approx(1e8)


def test_crf_weights_grown_past_what_the_messages_hold_stop_as_divergence(tmp_path, capsys):
    # Finite kernel weights of ~1e39 (μ·W) would make the next forward refuse them: the update is named, not saved.
    message, lr = _diverging(tmp_path, capsys, ["stage1.iterations=1", "stage2.iterations=4", "stage2.crf_lr=1e20",
                                                "stage2.lr=0", "crf.learn_bandwidths=false"], key="stage2.crf_lr")
    assert "stage 2 (CRF-as-RNN), step 1: the update made the CRF's weights too large: μ W_" in message
    assert "above 3.09e+26" in message and "that update is not saved" in message and lr == pytest.approx(1e19)


def test_bad_validation_label_is_caught_before_training(tmp_path, capsys):
    assert train.main(_bad_val_label(tmp_path, None)) == 1
    assert "size mismatch" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written: not even config.yaml


def test_check_files_false_defers_the_bad_label_to_the_first_evaluation(tmp_path, capsys):
    assert train.main(_bad_val_label(tmp_path, None, check=False)) == 1
    assert "size mismatch" in capsys.readouterr().err
    assert (tmp_path / "run" / "stage1" / "last.pt").is_file()  # it trained first


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(train.ConfigError, match="unknown config key"):
        train.main(["--debug", "stage1.lrr=1"])
    with pytest.raises(ValueError, match="must differ"):
        convert_main([str(tmp_path / "a.pt"), str(tmp_path / "a.pt"), "--debug"])


def test_a_second_evaluation_into_the_same_folder_is_not_offered_a_resume(work, tmp_path, capsys):
    # the message suggested "--resume <out>/eval_last", which is no run to resume
    checkpoint, out = work / "done" / "stage1" / "last.pt", tmp_path / "eval"
    held = out / "eval_last" / "results.json"
    held.parent.mkdir(parents=True)
    held.write_text("{}")
    assert train.main(["--eval-only", str(checkpoint), f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"{held.parent} already holds files (results.json): pass --overwrite to replace that evaluation" in err
    assert "--resume" not in err and held.read_text() == "{}"


def test_device_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert train.main(["device=cuda"]) == 2
    assert "device=cuda: CUDA is not available on this machine" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--eval-only", "CKPT", "out_dir=OUT", "eval.max_images=1"],
    ["out_dir=OUT", "eval.max_images=1", "--eval-only", "CKPT"],
    ["out_dir=OUT", "--eval-only", "CKPT", "eval.max_images=1"],  # was "unrecognized arguments: eval.max_images=1"
])
def test_overrides_may_stand_on_either_side_of_a_flag(work, tmp_path, argv):
    checkpoint = work / "done" / "stage1" / "last.pt"
    argv = [a.replace("CKPT", str(checkpoint)).replace("OUT", str(tmp_path / "eval")) for a in argv]
    args = train.parse_args(argv)
    assert args.eval_only == checkpoint and args.overrides == [f"out_dir={tmp_path / 'eval'}", "eval.max_images=1"]
    cfg, resume = train.resolve(args)
    assert cfg.out_dir == str(tmp_path / "eval") and cfg.eval.max_images == 1 and resume is None


@pytest.mark.parametrize("argv, overrides, flags", [
    (["--", "--overwrite"], ["--overwrite"], {"overwrite": False}),  # after "--" nothing is a flag
    (["seed=3", "--", "--stop-after", "1"], ["seed=3", "--stop-after", "1"], {"stop_after": None}),
    (["--resume", "--", "out_dir=D"], ["out_dir=D"], {"resume": ""}),  # (--resume's value as written)
    (["a=1", "--debug", "b=2", "--", "c=3"], ["a=1", "b=2", "c=3"], {"debug": True}),
])
def test_after_a_double_dash_everything_is_an_override(argv, overrides, flags):
    args = train.parse_args(argv)
    assert args.overrides == overrides and all(getattr(args, k) == v for k, v in flags.items())


def test_resume_names_an_override_it_took_but_not_a_path_with_an_equals_sign(tmp_path):
    for taken in ("out_dir=/tmp/run", "data.root=/data/voc", "stage1.lr=1e-3", "data.scale_range[-1]=0.6"):
        with pytest.raises(UsageError, match=re.escape(f"--resume {taken}: no such run directory or checkpoint; it "
                                                       f"reads as a KEY=VALUE override")):
            train.resolve(train.parse_args(["--resume", taken]))
    sweep = tmp_path / "lr=0.1"  # a sweep's folder: a path, not an override
    with pytest.raises(FileNotFoundError, match=re.escape(f"nothing to resume in {sweep}")):
        train.resolve(train.parse_args(["--resume", str(sweep)]))


@pytest.mark.parametrize("written", ["./lr=0.1", ".//lr=0.1", "../lr=0.1", "sweep/lr=0.1", "~/lr=0.1", "."])
def test_resume_takes_a_value_written_as_a_path_for_a_path(tmp_path, monkeypatch, capsys, written):
    # "./lr=0.1" was taken for an override (Path drops the "./"), and "." for --resume without a value (the config's
    # out_dir): each is the run directory the user wrote, named as written
    cwd = made(tmp_path / "cwd")
    monkeypatch.chdir(cwd)
    problem = "no stage2/last.pt or stage1/last.pt" if written == "." else "no such run directory or checkpoint"
    with pytest.raises(FileNotFoundError, match="^" + re.escape(f"nothing to resume in {written}: {problem}") + "$"):
        train.resolve(train.parse_args(["--resume", written]))
    assert train.main(["--resume", written]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: nothing to resume in {written}: {problem}" and "Traceback" not in err
    assert sorted(cwd.iterdir()) == []  # nothing written


def test_a_run_from_a_machine_with_another_device_resumes_with_a_device_override(work, tmp_path):
    # the run's config.yaml and its checkpoint name a GPU this machine lacks; device=cpu overrides the checkpoint's
    # value, and config.yaml, only compared with the checkpoint's config (model, dataset, root, seed), was refused
    # as a config to run ("config.yaml cannot be read as this run's config: ... device=cuda:99: ...")
    run = _copy(work, "paused", tmp_path / "run")
    save_config(dataclasses.replace(load_config(run / "config.yaml"), device="cuda:99"), run / "config.yaml")
    last = run / "stage1" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["config"]["device"] = "cuda:99"
    torch.save(checkpoint, last)
    with pytest.raises(train.ConfigError, match="^" + re.escape(f"{last} (its config): device=cuda:99: ")):
        train.resolve(train.parse_args(["--resume", str(run)]))
    cfg, resumed = train.resolve(train.parse_args(["--resume", str(run), "device=cpu"]))
    assert cfg.device == "cpu" and cfg.out_dir == str(run) and resumed["step"] == 1


def test_an_override_replaces_a_bad_value_saved_in_the_checkpoint(work, tmp_path):
    args, _, (run,) = _edited_config("stage1", "lr", math.nan, "")(tmp_path, work)
    cfg, _ = train.resolve(train.parse_args(args + ["stage1.lr=1e-3"]))
    assert cfg.stage1.lr == 1e-3 and cfg.out_dir == str(run)


def test_converter_overwrites_only_when_asked(work, tmp_path, capsys):
    src = work / "done" / "stage1" / "last.pt"
    dst = tmp_path / "out.pt"
    assert convert_main([str(src), str(dst)]) == 0
    first = dst.read_bytes()
    assert convert_main([str(src), str(dst)]) == 2 and dst.read_bytes() == first
    assert convert_main([str(src), str(dst), "--overwrite"]) == 0


# ---- a failed evaluation, labels that are all ignored, odd validation sizes, worker errors, a learned CRF


def _voc_run(root: Path, out: Path, *extra: str) -> list[str]:
    return TINY + VOC + [f"data.root={root}", f"out_dir={out}", *extra]


def test_a_failed_evaluation_keeps_the_steps_it_follows(tmp_path, capsys):
    root = voc_tree(tmp_path / "voc")  # a label value the validation scan (headers only) cannot see
    Image.fromarray(np.full((33, 33), 77, np.uint8)).save(root / "SegmentationClass" / "v.png")
    out = tmp_path / "run"
    assert train.main(_voc_run(root, out, "stage1.checkpoint_every=100")) == 1
    error = capsys.readouterr().err
    assert "v.png" in error and "77" in error and f"python train.py --resume {out}" in error
    assert load_checkpoint(out / "stage1" / "last.pt")["step"] == 2  # the training before it is saved


def test_a_network_that_evaluates_to_nan_is_named_not_scored(tmp_path, capsys, monkeypatch):
    # e.g. a float16 forward pass that overflows: its argmax would be scored as class 0 without a word
    build_network = train.build_network

    def nan_when_evaluated(cfg):
        network = build_network(cfg)
        network.register_forward_hook(lambda m, args, out: None if m.training else torch.full_like(out, math.nan))
        return network

    monkeypatch.setattr(train, "build_network", nan_when_evaluated)
    out = tmp_path / "run"
    assert train.main(TINY + [f"out_dir={out}"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert re.search(r"the network's logits for 2 evaluation image\(s\) hold \d+ NaN or infinite value", errors[0])
    assert load_checkpoint(out / "stage1" / "last.pt")["step"] == 2 and not (out / "results.json").exists()


def test_labels_that_are_all_ignored_warn_and_score_nothing(tmp_path, capsys, caplog):
    root = voc_tree(tmp_path / "voc")
    for label in (root / "SegmentationClass").glob("*.png"):
        Image.fromarray(np.full((33, 33), 255, np.uint8)).save(label)
    assert train.main(_voc_run(root, tmp_path / "run", "data.check_files=false")) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "have no labelled pixels" in errors[0], errors
    warned = [r.getMessage() for r in caplog.records if "no labelled pixels" in r.getMessage()]
    assert len(warned) == 1 and "step 1" in warned[0]  # at the first step, once


def test_validation_images_of_different_sizes_are_evaluated_in_batches(tmp_path):
    root = voc_tree(tmp_path / "voc", val_ids=("v", "w", "x"))
    Image.fromarray(np.zeros((40, 52, 3), np.uint8)).save(root / "JPEGImages" / "w.jpg")
    Image.fromarray(np.ones((40, 52), np.uint8)).save(root / "SegmentationClass" / "w.png")
    out = tmp_path / "run"
    assert train.main(_voc_run(root, out, "eval.batch_size=3", "eval.max_images=3")) == 0
    assert json.loads((out / "results.json").read_text())["results"]["network alone"]["pixel_acc"] > 0


def test_a_worker_reports_a_bad_file_like_the_main_process(tmp_path, capsys):
    root = voc_tree(tmp_path / "voc")
    (root / "JPEGImages" / "b.jpg").write_text("broken")
    lines = []
    for workers in (0, 1):
        assert train.main(_voc_run(root, tmp_path / f"run{workers}", "stage1.batch_size=3",
                                   f"data.workers={workers}")) == 1
        lines.append([line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")])
    assert lines[0] == lines[1] and len(lines[1]) == 1 and "b.jpg" in lines[1][0]
    assert "Traceback" not in lines[1][0] and "DataLoader worker" not in lines[1][0]


def test_a_learned_crf_in_init_from_starts_stage_2(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train")
    joint = tmp_path / "joint"
    assert train.main(TINY + ["stage1.iterations=0", "stage2.iterations=1", "stage2.crf_lr=0.5",
                              f"out_dir={joint}"]) == 0
    learned = load_checkpoint(joint / "stage2" / "last.pt")["model"]
    out = tmp_path / "from_joint"
    assert train.main(TINY + ["stage1.iterations=0", "stage2.iterations=1", "stage2.lr=0", "stage2.crf_lr=0",
                              "crf.theta_alpha=50", f"model.init_from={joint / 'stage2' / 'last.pt'}",
                              f"out_dir={out}"]) == 0
    assert any("its CRF initialises stage 2's CRF" in r.getMessage() for r in caplog.records)
    trained = load_checkpoint(out / "stage2" / "last.pt")["model"]
    crf = [k for k in learned if k.startswith("crf.")]
    assert crf and all(torch.equal(trained[k], learned[k]) for k in crf)  # not crf.theta_alpha=50's CRF


def test_ctrl_c_during_the_baselines_stops_the_run(tmp_path, capsys, monkeypatch):
    score_baselines = train.score_baselines

    def interrupted(*args, **kwargs):  # Ctrl-C while the baselines (and the grid search) are scored
        os.kill(os.getpid(), signal.SIGINT)
        return score_baselines(*args, **kwargs)

    monkeypatch.setattr(train, "score_baselines", interrupted)
    out = tmp_path / "run"
    assert train.main(TINY + [f"out_dir={out}"]) == 128 + signal.SIGINT
    assert f"resume with: python train.py --resume {out}" in capsys.readouterr().err
    assert not (out / "results.json").exists() and load_checkpoint(out / "stage1" / "last.pt")["step"] == 2


# ---- an evaluation cut short, a full disk, a second train.py in the same run directory


def kinds_and_steps(out: Path) -> list[tuple]:
    return [(r["kind"], r.get("step")) for r in records(out)]


def _steps(out: Path) -> list[tuple]:
    """What metrics.jsonl records, without the wall-clock entries."""
    return [(r["kind"], r.get("step"), r.get("loss"), r.get("network", {}).get("miou")) for r in records(out)]


def test_a_second_ctrl_c_during_an_evaluation_is_resumed_with_that_evaluation(tmp_path, monkeypatch):
    # The first Ctrl-C asks for a stop after the step; a second one, during the evaluation that follows, stops at
    # once (KeyboardInterrupt) with last.pt written before the evaluation. The resumed run skipped the evaluation:
    # no record of it, and stage1/best.pt the step-4 checkpoint where the uninterrupted run's is step 2's.
    args = TINY + ["stage1.iterations=4", "stage1.eval_every=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(args + [f"out_dir={straight}"]) == 0
    build_evaluator, calls = train.build_evaluator, []

    def interrupted_once(cfg, device):
        evaluate = build_evaluator(cfg, device)

        def call(*a, **k):
            calls.append(1)
            if len(calls) == 1:
                raise KeyboardInterrupt
            return evaluate(*a, **k)
        return call

    monkeypatch.setattr(train, "build_evaluator", interrupted_once)
    assert train.main(args + [f"out_dir={resumed}"]) == 128 + signal.SIGINT
    assert load_checkpoint(resumed / "stage1" / "last.pt")["step"] == 2 and len(calls) == 1
    monkeypatch.setattr(train, "build_evaluator", build_evaluator)
    assert train.main(["--resume", str(resumed)]) == 0
    assert _steps(resumed) == _steps(straight)
    assert ("eval", 2) in kinds_and_steps(resumed)
    for name in ("best.pt", "last.pt"):
        a, b = (load_checkpoint(d / "stage1" / name) for d in (straight, resumed))
        assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_failed_last_evaluation_is_done_on_resume(tmp_path, capsys):
    # the stage's last evaluation failed on a bad label; the data fixed, --resume went on to the baselines without
    # it: no stage1/best.pt (eval_every=0: that evaluation was the stage's only one) and no record of it
    root = voc_tree(tmp_path / "voc")
    good = (root / "SegmentationClass" / "v.png").read_bytes()
    Image.fromarray(np.full((33, 33), 77, np.uint8)).save(root / "SegmentationClass" / "v.png")
    out = tmp_path / "run"
    assert train.main(_voc_run(root, out)) == 1
    assert not (out / "stage1" / "best.pt").exists()
    (root / "SegmentationClass" / "v.png").write_bytes(good)
    assert train.main(["--resume", str(out)]) == 0
    assert (load_checkpoint(out / "stage1" / "best.pt")["step"], load_checkpoint(out / "stage1" / "last.pt")["step"]) \
        == (2, 2)
    assert kinds_and_steps(out) == [("train", 1), ("train", 2), ("eval", 2), ("final", None)]


def test_a_metrics_line_cut_after_its_record_gets_its_newline_back(work, tmp_path):
    # a kill (or a full disk) between a record and its newline: the resumed run's first record went onto that line
    out = _copy(work, "paused", tmp_path / "run")
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text().rstrip("\n"))
    assert train.main(["--resume", str(out)]) == 0
    assert kinds_and_steps(out) == [("train", 1), ("train", 2), ("eval", 2), ("final", None)]


def full_disk(monkeypatch, name: str) -> None:
    """Writing to a file named ``name`` (or to the temporary file of an atomic write of it) fails with ENOSPC, as
    on a full disk; opening it for writing still truncates it, as on a full disk."""
    real_open = io.open

    class Full:
        def __init__(self, file):
            self._file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, attribute):
            return getattr(self._file, attribute)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    def open_(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else str(file)
        named = Path(path).name == name or Path(path).name.startswith(f".{name}.")
        return Full(opened) if named and any(m in mode for m in "wax+") else opened

    monkeypatch.setattr(io, "open", open_)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds a file's name in /proc/self/fd")
@pytest.mark.parametrize("name", ["metrics.jsonl", "last.pt", "results.json", "results.md"])
def test_a_full_disk_names_the_file_and_keeps_the_previous_one(work, tmp_path, monkeypatch, capsys, name):
    # "error: [Errno 28] No space left on device", naming no file; results.json and results.md of the run resumed
    # (here a finished one, scored again) were emptied by the write that failed
    out = _copy(work, "done", tmp_path / "run")
    before = snapshot(out)
    full_disk(monkeypatch, name)
    assert train.main(["--resume", str(out), "stage1.iterations=3"] if name != "results.md" else
                      ["--resume", str(out)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    path = next(out.rglob(name))
    assert errors == [f"error: [Errno 28] No space left on device: '{path}'"]
    if name != "metrics.jsonl":
        assert path.read_bytes() == before[str(path.relative_to(out))]  # the previous file, whole


@pytest.mark.slow
def test_a_second_train_py_in_the_same_run_directory_is_refused(work, tmp_path):
    # two --resume of one run at once (a scheduler's retry while the first still runs) both trained, interleaving
    # their checkpoints and metrics records
    out = _copy(work, "paused", tmp_path / "run")
    first = subprocess.Popen([sys.executable, "train.py", "--resume", str(out), "stage1.iterations=400",
                              "log_every=1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(records(out)) < 4 and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-2000:]
        second = subprocess.run([sys.executable, "train.py", "--resume", str(out)], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert first.poll() is None  # (still training: the refusal was not for a finished run)
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert second.returncode == 2 and errors == [f"error: another train.py is writing to {out} (it holds a lock "
                                                 f"on the directory): wait until it has finished, or choose another "
                                                 f"out_dir"]
    steps = [r["step"] for r in records(out) if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, each step once


def test_eval_only_of_a_moved_run_writes_next_to_it(work, tmp_path):
    # the evaluation went to the out_dir the run was first written to (created anew if gone; here the shared run)
    moved = _copy(work, "done", tmp_path / "moved")
    before = snapshot(work / "done")
    assert train.main(["--eval-only", str(moved / "stage1" / "last.pt")]) == 0
    assert (moved / "eval_last" / "results.json").is_file() and snapshot(work / "done") == before


def test_a_signal_during_an_evaluation_stops_after_it_not_after_another_step(tmp_path, monkeypatch, capsys):
    # SIGTERM arrived while stage 1 evaluated at step 2: the run trained step 3 (and would have evaluated again with
    # eval_every=1) before it stopped, where the README promises the end of the current step
    build_evaluator = train.build_evaluator

    def signalled(cfg, device):
        evaluate = build_evaluator(cfg, device)

        def call(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            return evaluate(*a, **k)
        return call

    monkeypatch.setattr(train, "build_evaluator", signalled)
    out = tmp_path / "run"
    assert train.main(TINY + ["stage1.iterations=4", "stage1.eval_every=2", f"out_dir={out}"]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert load_checkpoint(out / "stage1" / "last.pt")["step"] == 2 and kinds_and_steps(out)[-1] == ("eval", 2)
    monkeypatch.setattr(train, "build_evaluator", build_evaluator)
    assert train.main(["--resume", str(out)]) == 0
    assert [step for kind, step in kinds_and_steps(out) if kind == "train"] == [1, 2, 3, 4]
