"""Worked example: a dense CRF on 3-D volumes, on top of a small network that predicts at stride 4.

The data are synthetic grey volumes with thick slices (voxel spacing 2 × 1 × 1 "mm", as in CT): thin tubes and
blobs with intensity noise (:mod:`crfrnn_deeplab.data.volumes`). A network that predicts at 1/4 resolution and
upsamples trilinearly cannot place a tube one or two voxels thick; the CRF compares positions in millimetres
and intensities, so it can. Three models are scored on held-out volumes, by mIoU and by boundary mIoU (the IoU
over the voxels within 2 voxels of a label boundary):

1. the network alone (trained with cross-entropy);
2. the network + a fixed CRF with hand-set parameters (post-processing);
3. network and CRF trained jointly from (1), the CRF's kernel weights, compatibility and bandwidths learned
   (and, as the control, the network of (1) trained on alone for as many steps).

    python examples/volumes_3d.py            # the figures of README "3-D volumes and other guidance": under a minute on one CPU core
    python examples/volumes_3d.py --quick    # smaller volumes and fewer steps (the test runs this)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crfrnn_deeplab import MeanFieldCRF
from crfrnn_deeplab.data.volumes import VOLUME_CLASSES, SyntheticVolumes

SPACING = (2.0, 1.0, 1.0)  # (D, H, W): slices twice as thick as the in-plane voxels
# Hand-set, as a user would: bandwidths in millimetres (θα about a blob's radius, θγ a voxel) and intensity
# units (θβ: the classes' intensities are 0, 0.5 and 1, the noise std 0.15).
CRF_PARAMS = dict(spatial_weight=1.0, bilateral_weight=6.0, theta_alpha=4.0, theta_beta=0.2, theta_gamma=1.0)
MODES = {
    "quick": dict(shape=(12, 24, 24), train=4, val=2, network_steps=40, joint_steps=5, batch=2),
    "full": dict(shape=(20, 40, 40), train=16, val=6, network_steps=300, joint_steps=60, batch=2),
}


class VolumeNet(nn.Module):
    """A small 3-D segmentation network with output stride 4: five 3×3×3 convolutions (one at full resolution,
    two strided, two dilated), a 1×1×1 classifier, trilinear upsampling to the input size.

    Args:
        in_channels: guidance channels of the input volume.
        num_classes: C.
        width: channels of the first layer (the others have twice as many).
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = len(VOLUME_CLASSES), width: int = 8) -> None:
        super().__init__()

        def block(cin: int, cout: int, **kw) -> nn.Sequential:
            conv = nn.Conv3d(cin, cout, 3, bias=False, **kw)
            return nn.Sequential(conv, nn.GroupNorm(4, cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_channels, width, padding=1),
            block(width, 2 * width, stride=2, padding=1),
            block(2 * width, 2 * width, stride=2, padding=1),
            block(2 * width, 2 * width, padding=2, dilation=2),
            block(2 * width, 2 * width, padding=4, dilation=4),
        )
        self.classifier = nn.Conv3d(2 * width, num_classes, 1)

    def forward(self, volume: Tensor) -> Tensor:
        """volume: Tensor[B, K, D, H, W] -> logits Tensor[B, C, D, H, W] (computed at 1/4, upsampled)."""
        logits = self.classifier(self.features(volume))
        return F.interpolate(logits, size=volume.shape[2:], mode="trilinear", align_corners=False)


def boundary_band(label: Tensor, width: int = 2) -> Tensor:
    """Voxels within ``width`` voxels (chessboard distance) of a label boundary: bool Tensor[B, D, H, W]."""
    edge = torch.zeros_like(label, dtype=torch.bool)
    for axis in (1, 2, 3):
        step = label.diff(dim=axis) != 0  # a boundary between voxels i and i+1 along the axis: mark both
        edge |= F.pad(step, [0, 0] * (3 - axis) + [0, 1]) | F.pad(step, [0, 0] * (3 - axis) + [1, 0])
    return F.max_pool3d(edge[:, None].float(), 2 * width + 1, stride=1, padding=width)[:, 0] > 0


def miou(prediction: Tensor, label: Tensor, where: Tensor | None = None, num_classes: int = 3) -> tuple[float, list]:
    """Mean IoU over the classes present (in ``where`` only, if given) and the per-class IoUs."""
    if where is not None:
        prediction, label = prediction[where], label[where]
    counts = torch.bincount(label.flatten() * num_classes + prediction.flatten(), minlength=num_classes**2)
    confusion = counts.view(num_classes, num_classes).double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diagonal()
    iou = confusion.diagonal() / union.clamp_min(1)
    return float(iou[union > 0].mean()), iou.tolist()


def stacked(data: SyntheticVolumes) -> tuple[Tensor, Tensor]:
    volumes, labels = zip(*(data[i] for i in range(len(data))))
    return torch.stack(volumes), torch.stack(labels)


@torch.no_grad()
def evaluate(net: VolumeNet, crf: MeanFieldCRF | None, volumes: Tensor, labels: Tensor) -> dict[str, float]:
    net.eval()
    predictions = []
    for volume in volumes.split(1):
        logits = net(volume)
        if crf is not None:
            logits = crf.eval()(logits, volume)
        predictions.append(logits.argmax(1))
    prediction = torch.cat(predictions)
    overall, per_class = miou(prediction, labels)
    boundary, _ = miou(prediction, labels, boundary_band(labels))
    return {"mIoU": overall, "boundary mIoU": boundary, "tube IoU": per_class[VOLUME_CLASSES.index("tube")]}


def class_weights(labels: Tensor, num_classes: int = len(VOLUME_CLASSES)) -> Tensor:
    """Cross-entropy weights ``1/√frequency`` (mean 1): tubes are 2 % of the voxels, and a network trained on the
    plain loss learns to ignore them."""
    frequency = torch.bincount(labels.flatten(), minlength=num_classes).double() / labels.numel()
    weights = frequency.clamp_min(1e-6).rsqrt()
    return (weights / weights.mean()).float()


def train(net: VolumeNet, crf: MeanFieldCRF | None, volumes: Tensor, labels: Tensor, *, steps: int, batch: int,
          lr: float, seed: int) -> None:
    """Adam on the class-weighted cross-entropy of the network's (or the CRF's) logits; the CRF's parameters at
    10× the rate."""
    weights = class_weights(labels)
    groups = [{"params": net.parameters(), "lr": lr}]
    if crf is not None:
        groups.append({"params": [p for p in crf.parameters() if p.requires_grad], "lr": 10 * lr})
    optimiser = torch.optim.Adam(groups)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        index = torch.randint(len(volumes), (batch,), generator=g)
        volume, label = volumes[index], labels[index]
        if torch.rand((), generator=g) < 0.5:  # flip left-right
            volume, label = volume.flip(-1), label.flip(-1)
        logits = net(volume)
        if crf is not None:
            logits = crf.train()(logits, volume)
        loss = F.cross_entropy(logits, label, weight=weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small volumes and few steps (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (volumes this small run fastest on one)")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train_set = SyntheticVolumes(num_volumes=mode["train"], shape=mode["shape"], spacing=SPACING, seed=args.seed)
    val_set = SyntheticVolumes(num_volumes=mode["val"], shape=mode["shape"], spacing=SPACING, seed=args.seed + 1000)
    (volumes, labels), (val_volumes, val_labels) = stacked(train_set), stacked(val_set)

    net = VolumeNet()
    train(net, None, volumes, labels, steps=mode["network_steps"], batch=mode["batch"], lr=1e-2, seed=args.seed)
    fixed = MeanFieldCRF(num_classes=len(VOLUME_CLASSES), spatial_dims=3, guidance_groups=(1,), spacing=SPACING,
                         learn_kernel_weights=False, learn_compatibility=False, learn_bandwidths=False, **CRF_PARAMS)
    results = {"network alone": evaluate(net, None, val_volumes, val_labels),
               "network + fixed CRF": evaluate(net, fixed, val_volumes, val_labels)}

    # The control: the network alone, trained on for as many steps as the joint training takes.
    alone = copy.deepcopy(net)
    train(alone, None, volumes, labels, steps=mode["joint_steps"], batch=mode["batch"], lr=1e-3, seed=args.seed + 1)
    results["network, trained on"] = evaluate(alone, None, val_volumes, val_labels)
    crf = MeanFieldCRF(num_classes=len(VOLUME_CLASSES), spatial_dims=3, guidance_groups=(1,), spacing=SPACING,
                       train_iterations=5, eval_iterations=10, **CRF_PARAMS)
    train(net, crf, volumes, labels, steps=mode["joint_steps"], batch=mode["batch"], lr=1e-3, seed=args.seed + 1)
    results["jointly trained"] = evaluate(net, crf, val_volumes, val_labels)

    shape = "×".join(map(str, mode["shape"]))
    print(f"{len(val_set)} validation volumes of {shape} voxels, spacing {SPACING}; boundary band: 2 voxels")
    print(f"{'':<22}{'mIoU':>8}{'boundary mIoU':>15}{'tube IoU':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['mIoU']:>8.3f}{r['boundary mIoU']:>15.3f}{r['tube IoU']:>10.3f}")
    bw = crf.bandwidths
    print(f"learned CRF: θα {bw['theta_alpha']:.3g} mm, θβ {bw['theta_beta']:.3g}, θγ {bw['theta_gamma']:.3g} mm, "
          f"bilateral weight (diagonal) {[round(w, 2) for w in crf.bilateral_weight.diagonal().tolist()]}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return results


if __name__ == "__main__":
    main()
