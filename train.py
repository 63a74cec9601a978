"""Train DeepLab v2 (stage 1), then the network and its dense CRF jointly as CRF-as-RNN (stage 2), and compare.

    python train.py                                   # the embedded synthetic data, both stages, CPU
    python train.py --config configs/voc12_deeplabv2.yaml data.root=/data/VOCdevkit/VOC2012
    python train.py stage1.iterations=100 crf.learn_bandwidths=false

Stage 1 (Chen et al., DeepLab v2): SGD, momentum 0.9, weight decay 5e-4, poly learning rate (power 0.9), the head
at 10× (weights) and 20× (biases, no decay) the backbone's rate. Stage 2 (Zheng et al., CRF-as-RNN): the
stage-1 network plus :class:`~crfrnn_deeplab.MeanFieldCRF`, trained end to end with the CRF's parameters in
their own group. The final table compares, on the validation split, the network alone, the network with the
initial fixed-weight CRF, and the jointly trained model — mIoU and boundary (trimap) mIoU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from crfrnn_deeplab import CRFRNN, EvalTransform, MeanFieldCRF, MSCOutput, TrainTransform, get_model
from crfrnn_deeplab import datasets as ds
from crfrnn_deeplab.checkpoint import save_checkpoint
from crfrnn_deeplab.config import Config, StageConfig, load_config, to_dict
from crfrnn_deeplab.metrics import ConfusionMatrix, boundary_band
from crfrnn_deeplab.runtime import retain_freed_memory

logger = logging.getLogger("train")
BANDS = (2, 5, 10)
GRID = {"bilateral_weight": (3.0, 5.0, 10.0), "theta_alpha": (10.0, 20.0, 40.0, 80.0), "theta_beta": (5.0, 13.0, 30.0, 60.0)}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_datasets(cfg: Config, convention) -> tuple[Any, Any, Any]:
    """Training, validation and held-out (CRF grid search) datasets with the DeepLab transforms.

    The held-out images never appear in the validation numbers: synthetic data draws them from another seed;
    real datasets use the first ``data.held_out_images`` of the validation list (the DeepLab protocol) — the
    validation numbers then include them, as in the paper.
    """
    d = cfg.data
    train_tf = TrainTransform(convention, crop_size=d.crop_size, ignore_index=d.ignore_index, seed=cfg.seed)
    eval_tf = EvalTransform(convention)
    if d.dataset == "synthetic":
        common = dict(size=d.image_size, transform=eval_tf)
        return (
            ds.SyntheticSegmentation(split="train", num_images=d.train_images, seed=cfg.seed, size=d.image_size,
                                     transform=train_tf),
            ds.SyntheticSegmentation(split="val", num_images=d.val_images, seed=cfg.seed, **common),
            ds.SyntheticSegmentation(split="val", num_images=d.held_out_images, seed=cfg.seed + 1, **common),
        )
    train_set, val_set = _real_datasets(cfg, train_tf, eval_tf)
    subset = torch.utils.data.Subset(val_set, range(min(d.held_out_images, len(val_set))))
    return train_set, val_set, subset


def _real_datasets(cfg: Config, train_tf, eval_tf) -> tuple[Any, Any]:
    d = cfg.data
    root = Path(d.root)
    if d.dataset == "voc12_aug":
        return ds.VOCAugSegmentation(root / "VOC2012", root / "SBD", transform=train_tf), ds.VOCSegmentation(
            root / "VOC2012", split="val", transform=eval_tf
        )
    if d.dataset == "voc12":
        return (ds.VOCSegmentation(root, split="train", transform=train_tf),
                ds.VOCSegmentation(root, split="val", transform=eval_tf))
    if d.dataset == "coco_stuff":
        return (ds.COCOStuffSegmentation(root, split="train", transform=train_tf),
                ds.COCOStuffSegmentation(root, split="val", transform=eval_tf))
    if d.dataset == "cityscapes":
        return (ds.CityscapesSegmentation(root, split="train", transform=train_tf),
                ds.CityscapesSegmentation(root, split="val", transform=eval_tf))
    raise ValueError(f"unknown data.dataset {d.dataset!r}")


def build_network(cfg: Config) -> nn.Module:
    network = get_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.options)
    if cfg.model.init_from:
        from crfrnn_deeplab.convert import load_into

        logger.info("%s", load_into(network, cfg.model.init_from))
    return network


def build_crf(cfg: Config) -> MeanFieldCRF:
    c = cfg.crf
    return MeanFieldCRF(
        num_classes=cfg.model.num_classes,
        spatial_weight=c.spatial_weight,
        bilateral_weight=c.bilateral_weight,
        theta_alpha=c.theta_alpha,
        theta_beta=c.theta_beta,
        theta_gamma=c.theta_gamma,
        normalization=c.normalization,
        train_iterations=c.train_iterations,
        eval_iterations=c.eval_iterations,
        learn_bandwidths=c.learn_bandwidths,
    )


def build_optimizer(model: nn.Module, stage: StageConfig) -> tuple[torch.optim.Optimizer, Any]:
    """SGD with the DeepLab v2 groups (chosen by structure) and a poly schedule."""
    groups = [
        {"params": model.backbone_parameters(), "lr": stage.lr, "weight_decay": stage.weight_decay},
        {"params": model.head_weights(), "lr": 10 * stage.lr, "weight_decay": stage.weight_decay},
        {"params": model.head_biases(), "lr": 20 * stage.lr, "weight_decay": 0.0},
    ]
    if isinstance(model, CRFRNN):
        groups.append({"params": model.crf_parameters(), "lr": stage.crf_lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.SGD(groups, lr=stage.lr, momentum=stage.momentum)
    total = max(1, stage.iterations)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total) ** stage.poly_power)
    return optimizer, scheduler


def segmentation_loss(output: torch.Tensor | MSCOutput, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy on full-resolution logits; for MSC, on the fused and on every scale's logits."""
    if isinstance(output, MSCOutput):
        outputs = [output.fused, *output.per_scale]
    else:
        outputs = [output]
    return sum(F.cross_entropy(o, label, ignore_index=ignore_index) for o in outputs)


def train_steps(model: nn.Module, loader: DataLoader, stage: StageConfig, cfg: Config, desc: str) -> list[float]:
    """``stage.iterations`` optimiser steps (each over ``stage.accumulate`` batches); returns the losses."""
    device = torch.device(cfg.device)
    optimizer, scheduler = build_optimizer(model, stage)
    batches = itertools.cycle(loader) if len(loader) else iter(())
    model.train()
    losses = []
    bar = tqdm(range(stage.iterations), desc=desc, dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(stage.accumulate):
            batch = next(batches)
            image, label = batch["image"].to(device), batch["label"].to(device)
            if isinstance(model, CRFRNN):
                out = model(image, batch["raw"].to(device), batch["valid"].to(device))
                loss = segmentation_loss(out.crf, label, cfg.data.ignore_index) + segmentation_loss(
                    out.network, label, cfg.data.ignore_index
                )
            else:
                loss = segmentation_loss(model(image), label, cfg.data.ignore_index)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}; stopping")
            (loss / stage.accumulate).backward()
            total += loss.item() / stage.accumulate
        optimizer.step()
        scheduler.step()
        losses.append(total)
        if step % cfg.log_every == 0 or step == stage.iterations - 1:
            rate = (step + 1) * stage.accumulate * loader.batch_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", img_s=f"{rate:.1f}")
    return losses


@torch.no_grad()
def evaluate(network: nn.Module, crfs: dict[str, MeanFieldCRF | None], loader: DataLoader, cfg: Config) -> dict:
    """mIoU and boundary mIoU (bands of 2/5/10 px) of the network alone and with each CRF."""
    device = torch.device(cfg.device)
    network.eval()
    c, ignore = cfg.model.num_classes, cfg.data.ignore_index
    whole = {name: ConfusionMatrix(c, ignore_index=ignore) for name in crfs}
    bands = {(name, w): ConfusionMatrix(c, ignore_index=ignore) for name in crfs for w in BANDS}
    for batch in loader:
        image, label = batch["image"].to(device), batch["label"].to(device)
        logits = network(image)
        band_masks = {w: boundary_band(label, w, ignore_index=ignore) for w in BANDS}
        for name, crf in crfs.items():
            out = logits if crf is None else crf.eval()(logits, batch["raw"].to(device), batch["valid"].to(device))
            pred = out.argmax(1)
            whole[name].update(pred.cpu(), label.cpu())
            for w in BANDS:
                bands[(name, w)].update(pred.cpu(), label.cpu(), mask=band_masks[w].cpu())
    results = {}
    for name in crfs:
        s = whole[name].scores()
        results[name] = {"miou": s["miou"], "pixel_acc": s["pixel_acc"]}
        for w in BANDS:
            results[name][f"boundary_miou_{w}px"] = bands[(name, w)].scores()["miou"]
    return results


def grid_search_crf(network: nn.Module, loader: DataLoader, cfg: Config) -> tuple[MeanFieldCRF, dict[str, float]]:
    """The post-processing baseline (Chen et al., DeepLab v2, Sec. 4.1): a fixed-weight CRF whose bilateral
    weight, θα and θβ are grid-searched for mIoU on held-out images (spatial kernel fixed)."""
    device = torch.device(cfg.device)
    network.eval()
    cached = []
    with torch.no_grad():
        for batch in loader:
            cached.append((network(batch["image"].to(device)), batch["raw"].to(device), batch["valid"].to(device),
                           batch["label"]))
    best, best_miou = None, -1.0
    for w, alpha, beta in itertools.product(GRID["bilateral_weight"], GRID["theta_alpha"], GRID["theta_beta"]):
        crf = MeanFieldCRF(num_classes=cfg.model.num_classes, spatial_weight=cfg.crf.spatial_weight,
                           bilateral_weight=w, theta_alpha=alpha, theta_beta=beta, theta_gamma=cfg.crf.theta_gamma,
                           eval_iterations=cfg.crf.eval_iterations).to(device).eval()
        cm = ConfusionMatrix(cfg.model.num_classes, ignore_index=cfg.data.ignore_index)
        with torch.no_grad():
            for logits, raw, valid, label in cached:
                cm.update(crf(logits, raw, valid).argmax(1).cpu(), label)
        miou = cm.scores()["miou"]
        if miou > best_miou:
            best, best_miou, params = crf, miou, {"bilateral_weight": w, "theta_alpha": alpha, "theta_beta": beta}
    return best, dict(params, held_out_miou=best_miou)


def format_table(results: dict[str, dict[str, float]]) -> str:
    cols = ["miou", "pixel_acc"] + [f"boundary_miou_{w}px" for w in BANDS]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[k]:.2f}" for k in cols) + " |")
    return "\n".join(lines)


def checkpoint(path: Path, model: nn.Module, cfg: Config, step: int, crf: bool) -> None:
    network = model.network if isinstance(model, CRFRNN) else model
    crf_config = dataclass_dict(cfg.crf) if crf else None
    save_checkpoint(path, {
        "model": model.state_dict(),
        "model_config": {"name": cfg.model.name, "num_classes": cfg.model.num_classes,
                         "options": dict(cfg.model.options), "crf": crf_config},
        "input_convention": network.input_convention.to_dict(),
        "class_names": None,
        "step": step,
        "config": to_dict(cfg),
    })


def dataclass_dict(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: v for k, v in asdict(obj).items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file overriding the defaults (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied last")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(cfg.threads)
    retain_freed_memory()
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    started = time.perf_counter()

    network = build_network(cfg).to(cfg.device)
    train_set, val_set, held_out = build_datasets(cfg, network.input_convention)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                              num_workers=cfg.data.workers, generator=generator)
    # Real validation images differ in size, so they go one by one (no resizing of labels for evaluation).
    eval_batch = cfg.data.batch_size if cfg.data.dataset == "synthetic" else 1
    val_loader = DataLoader(val_set, batch_size=eval_batch, num_workers=cfg.data.workers)

    if cfg.stage1.iterations:
        train_steps(network, train_loader, cfg.stage1, cfg, "stage 1: DeepLab v2")
        checkpoint(out / "stage1.pt", network, cfg, cfg.stage1.iterations, crf=False)
    initial_crf = build_crf(cfg).to(cfg.device)
    searched_crf, searched = grid_search_crf(network, DataLoader(held_out, batch_size=eval_batch), cfg)
    logger.info("grid-searched post-processing CRF: %s", searched)
    joint = CRFRNN(network=network, crf=build_crf(cfg)).to(cfg.device)
    results = evaluate(
        network,
        {"network": None, "network + initial CRF": initial_crf, "network + grid-searched CRF": searched_crf},
        val_loader,
        cfg,
    )
    if cfg.stage2.iterations:
        train_steps(joint, train_loader, cfg.stage2, cfg, "stage 2: CRF-as-RNN")
        checkpoint(out / "final.pt", joint, cfg, cfg.stage2.iterations, crf=True)
        joint_results = evaluate(joint.network, {"joint network": None, "joint network + learned CRF": joint.crf},
                                 val_loader, cfg)
        results.update(joint_results)
        logger.info("learned CRF bandwidths: %s", joint.crf.bandwidths)
    table = format_table(results)
    minutes = (time.perf_counter() - started) / 60
    print(f"\nValidation ({len(val_set)} images), {minutes:.1f} min\n{table}")
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
