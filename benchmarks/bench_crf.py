"""Benchmarks of the dense CRF layer (issue #3): accuracy, speed against densecrf, training cost, scaling.

Every figure is measured in this run; ratios compare against a reference timed in the same process.

    python benchmarks/bench_crf.py                 # everything, CPU, 2 threads
    python benchmarks/bench_crf.py --only speed    # one section: accuracy | speed | training | scaling | cuda | volumes
                                                   # | small
    python benchmarks/bench_crf.py --malloc default  # glibc's default allocator settings (see crfrnn_deeplab/allocator.py)
    python benchmarks/bench_crf.py --isa avx2      # as on a CPU without AVX-512 (PyTorch, MKL, oneDNN, FBGEMM)

Sections:
    accuracy  lattice filtering vs the brute-force Gaussian (d = 2, 5), ours and densecrf's lattice.
    speed     inference, 500×375, 21 classes, 10 iterations, densecrf's usual parameters, vs pydensecrf2: with 1
              and 2 threads, and with competing CPU-bound work (a busy core; another 2-thread job) timed
              under the same load; agreement after 1, 5 and 10 iterations.
    training  5 iterations forward+backward at 321×321, 21 classes, vs deeplabv2_resnet101 forward+backward.
    scaling   time and peak memory from 128² to 1024² (each size in a fresh process), and a 1024×2048
              Cityscapes frame with 19 classes.
    cuda      milliseconds per iteration at 513×513 and 1024×2048 (skipped without a GPU).
    small     images of at most 1024 pixels, which take the exact bilateral filter by default: its time against the
              lattice's (inference, 10 iterations; training, 5 iterations forward+backward, everything learned),
              interleaved pairs at 1 thread, and how far each (and densecrf) is from the exact dense CRF; and
              40×40, above that size, where the default takes the lattice.
    volumes   3-D: a 96³ synthetic volume, 1 guidance channel, 3 classes, 10 iterations, 1 thread, vs pydensecrf2's
              generic DenseCRF on the same features; time for 4× the voxels (median of per-round ratios); peak
              memory at 128³ (fresh process).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crfrnn_deeplab import MeanFieldCRF
from crfrnn_deeplab.data.synthetic import render_synthetic
from crfrnn_deeplab.data.volumes import render_volume
from crfrnn_deeplab.allocator import retain_freed_memory

# The environment that makes PyTorch's own kernels, MKL, oneDNN and FBGEMM dispatch to AVX2 code on a CPU that
# has AVX-512 (each library's documented variable): the speed targets must hold on CPUs of both kinds, and this
# measures the other kind on the same machine, in the same conditions. pydensecrf2 is compiled code that does
# not dispatch at run time; it runs as it always does.
AVX2_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}

DENSECRF_PARAMS = dict(spatial_weight=3.0, bilateral_weight=10.0, theta_alpha=80.0, theta_beta=13.0, theta_gamma=3.0)


def scene(height: int, width: int, num_classes: int, seed: int = 0, kind: str = "synthetic"):
    """A test input: an image (uint8 [H, W, 3]) and noisy unary logits (float32 [C, H, W])."""
    rng = np.random.default_rng(seed)
    if kind == "synthetic":
        image, label = render_synthetic(np.random.default_rng([seed, 7]), height, width)
    else:  # uniform noise: the worst case for a lattice (every pixel its own colour)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        label = rng.integers(0, num_classes, (height, width))
    label = label % num_classes
    logits = 2.0 * np.eye(num_classes, dtype=np.float32)[label].transpose(2, 0, 1)
    logits += rng.normal(0, 1.5, logits.shape).astype(np.float32)
    return np.ascontiguousarray(image), logits


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds, after ``warmup`` calls (the allocator's heap reaches its steady
    size: the first calls of a process pay page faults that later ones do not)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_pairs(
    reference, ours, repeats: int, warmup: int = 2, clock=time.perf_counter
) -> tuple[float, float, list[float]]:
    """Times two functions interleaved (each pair in alternating order), so that a slow stretch of a shared
    machine hits both alike: (median reference seconds, median ours seconds, per-pair ratios ours/reference).
    ``clock``: the wall clock, or e.g. ``time.process_time`` (this process's CPU time: with one thread the work
    done, much less sensitive to other processes on a shared machine)."""
    for _ in range(warmup):
        reference()
        ours()
    times = timed_rounds({"reference": reference, "ours": ours}, repeats, clock=clock)
    ratios = [o / max(r, 1e-9) for o, r in zip(times["ours"], times["reference"])]
    return statistics.median(times["reference"]), statistics.median(times["ours"]), ratios


def timed_rounds(steps: dict, rounds: int, sync=lambda: None, clock=time.perf_counter) -> dict[str, list[float]]:
    """Times in seconds of every step (name -> function, already warmed up) in each of ``rounds`` rounds, the
    order rotating from round to round (two steps: alternating), so that a slow stretch of a shared machine hits
    every step alike: the per-round ratios of two steps (:func:`ratio_range`) then compare. ``sync`` runs after
    each call (e.g. ``torch.cuda.synchronize``); ``clock`` as in :func:`timed_pairs`."""
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            steps[name]()
            sync()
            times[name].append(clock() - start)
    return times


def ratio_range(numerators: list[float], denominators: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``median (min-max)`` of the per-round ratios ``scale · numerator / denominator``."""
    ratios = [scale * n / d for n, d in zip(numerators, denominators)]
    return f"{statistics.median(ratios):.{digits}f} ({min(ratios):.{digits}f}-{max(ratios):.{digits}f})"


def run_densecrf(image: np.ndarray, logits: np.ndarray, iterations: int) -> np.ndarray:
    import pydensecrf.densecrf as dcrf

    c, h, w = logits.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-logits.reshape(c, -1)))
    p = DENSECRF_PARAMS
    crf.addPairwiseGaussian(sxy=p["theta_gamma"], compat=p["spatial_weight"])
    crf.addPairwiseBilateral(sxy=p["theta_alpha"], srgb=p["theta_beta"], rgbim=image, compat=p["bilateral_weight"])
    return np.array(crf.inference(iterations)).reshape(c, h, w)


def ours_inference(image: np.ndarray, logits: np.ndarray, iterations: int, device: str = "cpu"):
    crf = MeanFieldCRF(num_classes=logits.shape[0], eval_iterations=iterations, **DENSECRF_PARAMS).eval().to(device)
    z = torch.from_numpy(logits)[None].to(device)
    im = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device)

    def fn():
        with torch.no_grad():
            out = crf(z, im)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return fn


def section_accuracy(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "crf"))
    from test_lattice import densecrf_lattice_filter, image_features

    from crfrnn_deeplab.crf.reference import dense_gaussian
    from crfrnn_deeplab.crf.lattice import build_lattice

    print("\n## Lattice accuracy: relative L2 error of K·v against the brute-force Gaussian")
    print("(the lattice is off by a near-constant factor that the CRF's normalisation removes; 'shape' is the")
    print(" error left after the best scalar fit)")
    print(f"{'data':<24}{'d':>3}{'ours':>10}{'densecrf':>10}{'ours shape':>12}{'max |ours-densecrf|':>22}")
    for d in (2, 5):
        for kind in ("random N(0,1.5²), N=400", "image 20×24"):
            rng = np.random.default_rng(d)
            feats = rng.normal(0, 1.5, (400, d)) if kind.startswith("random") else image_features(rng, 20, 24, d)
            values = rng.uniform(0, 1, feats.shape[0])
            exact = (dense_gaussian(torch.tensor(feats)) @ torch.tensor(values)).numpy()
            ours = build_lattice(torch.tensor(feats).T[None]).filter(torch.tensor(values)[None, :, None])[0, :, 0].numpy()
            theirs = densecrf_lattice_filter(feats, values)
            rel = lambda x: np.linalg.norm(x - exact) / np.linalg.norm(exact)  # noqa: E731
            fitted = ours * (ours @ exact) / (ours @ ours)
            print(f"{kind:<24}{d:>3}{rel(ours):>10.4f}{rel(theirs):>10.4f}{rel(fitted):>12.4f}"
                  f"{np.abs(ours - theirs).max():>22.2e}")


# Competing CPU-bound work for the contention rows of section_speed, each run in its own process.
LOADS = {
    "busy core": ("one core kept busy (a Python busy loop, 1 thread, as a DataLoader worker)",
                  "while True: pass"),
    "2-thread job": ("another 2-thread job (a loop of 1024×1024 torch matmuls, torch.set_num_threads(2))",
                     "import torch\ntorch.set_num_threads(2)\nx = torch.randn(1024, 1024)\nwhile True: x @ x"),
}


def competing_load(code: str) -> subprocess.Popen:
    """Starts ``code`` in a fresh Python process (stop it with ``.kill()``) and lets it get going."""
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return process


def section_speed(args) -> None:
    from crfrnn_deeplab.crf.threads import inference_threads, set_inference_threads, thread_policy

    print("\n## Inference 500×375, 21 classes, 10 iterations, CPU, vs pydensecrf2 (always 1 thread)")
    print("(timed in interleaved pairs; ratio = ours / densecrf, median of the per-pair ratios, with their range;")
    print(" 'threads': torch threads given / used by our CRF, median over the pairs (the adaptive policy of")
    print(" crfrnn_deeplab.crf.threads uses at most the cores free when a call starts; ', all': the 'all' policy,")
    print(" every thread whatever the load))")
    print(f"{'setting':<19}{'image':<11}{'threads':>9}{'densecrf ms':>13}{'ours ms':>10}{'ratio':>8}{'range':>13}"
          f"{'mean|ΔQ|':>11}{'argmax agree':>14}")
    settings = [("1 thread", 1, 1, None), ("2 threads", 2, 2, None)]
    for name, (_, code) in LOADS.items():  # the default policy, then every thread whatever the load (as before it)
        settings += [(name, 2, "adaptive", code), (f"{name}, all", 2, "all", code)]
    threads, policy = torch.get_num_threads(), thread_policy()
    scenes = {kind: scene(375, 500, 21, kind=kind) for kind in ("synthetic", "noise")}
    refs = {kind: run_densecrf(image, logits, 10) for kind, (image, logits) in scenes.items()}
    try:
        for name, given, chosen, load in settings:
            torch.set_num_threads(given)
            set_inference_threads(chosen)
            process = None if load is None else competing_load(load)
            try:
                for kind, (image, logits) in scenes.items():
                    fn = ours_inference(image, logits, 10)
                    used = []

                    def ours():
                        used.append(inference_threads())  # what the policy picks now (it picks again inside)
                        return fn()

                    q = torch.softmax(fn(), 1)[0].numpy()
                    t_theirs, t_ours, ratios = timed_pairs(lambda: run_densecrf(image, logits, 10), ours,
                                                           args.repeats)
                    ref = refs[kind]
                    print(f"{name:<19}{kind:<11}{f'{given}/{statistics.median(used):g}':>9}{t_theirs * 1e3:>13.1f}"
                          f"{t_ours * 1e3:>10.1f}{statistics.median(ratios):>8.2f}"
                          f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>13}"
                          f"{np.abs(q - ref).mean():>11.2e}{(q.argmax(0) == ref.argmax(0)).mean():>14.4f}")
            finally:
                if process is not None:
                    process.kill()
                    process.wait()
    finally:
        torch.set_num_threads(threads)
        set_inference_threads(policy)
    for name, (what, _) in LOADS.items():
        print(f"load '{name}': {what}, started before and stopped after its rows")

    print("\n## Agreement with pydensecrf2 after T iterations (500×375, 21 classes)")
    print(f"{'image':<11}{'T':>4}{'mean|ΔQ|':>11}{'argmax agree':>14}")
    for kind, (image, logits) in scenes.items():
        for iterations in (1, 5, 10):
            q = torch.softmax(ours_inference(image, logits, iterations)(), 1)[0].numpy()
            ref = run_densecrf(image, logits, iterations)
            agree = (q.argmax(0) == ref.argmax(0)).mean()
            print(f"{kind:<11}{iterations:>4}{np.abs(q - ref).mean():>11.2e}{agree:>14.4f}")


def section_small(args) -> None:
    from crfrnn_deeplab.crf.reference import dense_crf

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("\n## Small images (<= 1024 pixels; 40×40 above): the exact filter vs the lattice, 1 thread, densecrf's "
          "parameters")
    print("(time: interleaved pairs, ratio = exact / lattice, median of the per-pair ratios and their range; "
          "|ΔQ|: mean over pixels and classes after 10 iterations against the float64 exact dense CRF)")
    print(f"{'image':<22}{'inference ms lattice/exact':>28}{'ratio':>7}{'range':>12}{'training ms lattice/exact':>27}"
          f"{'ratio':>7}{'range':>12}{'|ΔQ| lattice':>14}{'exact':>9}{'densecrf':>10}")
    try:
        # (40×40: above the default's threshold, where "auto" takes the lattice: what the exact filter would cost)
        sizes = ((16, 16, 5), (24, 32, 5), (32, 32, 5), (32, 32, 21), (40, 40, 5), (40, 40, 21))
        for (h, w, c), kind in itertools.product(sizes,
                                                 ("synthetic", "noise")):
            image, logits = scene(h, w, c, kind=kind)
            z = torch.from_numpy(logits)[None]
            im = torch.from_numpy(image).permute(2, 0, 1)[None].float()
            layers = {f: MeanFieldCRF(num_classes=c, bilateral_filter=f, train_iterations=5, eval_iterations=10,
                                      **DENSECRF_PARAMS) for f in ("lattice", "exact")}

            def infer(f):
                def fn():
                    with torch.no_grad():
                        return layers[f].eval()(z, im)
                return fn

            def train(f):
                def fn():
                    x = z.clone().requires_grad_(True)
                    layers[f].train()(x, im).square().sum().backward()
                return fn

            t_lat, t_exact, r_inf = timed_pairs(infer("lattice"), infer("exact"), args.repeats)
            u_lat, u_exact, r_train = timed_pairs(train("lattice"), train("exact"), args.repeats)
            params = {k: torch.tensor(v, dtype=torch.float64) for k, v in DENSECRF_PARAMS.items()}
            eye = torch.eye(c, dtype=torch.float64)
            exact = torch.softmax(dense_crf(z.double(), im.double(), spatial_weight=params["spatial_weight"] * eye,
                                            bilateral_weight=params["bilateral_weight"] * eye, compatibility=1 - eye,
                                            theta_alpha=params["theta_alpha"], theta_beta=params["theta_beta"],
                                            theta_gamma=params["theta_gamma"], iterations=10), 1)[0]
            errors = [float((torch.softmax(infer(f)(), 1)[0].double() - exact).abs().mean()) for f in layers]
            errors.append(float((torch.from_numpy(run_densecrf(image, logits, 10)).double() - exact).abs().mean()))
            rng = lambda r: f"{min(r):.2f}-{max(r):.2f}"  # noqa: E731
            print(f"{f'{h}×{w} C{c} {kind}':<22}{f'{t_lat * 1e3:.1f} / {t_exact * 1e3:.1f}':>28}"
                  f"{statistics.median(r_inf):>7.2f}{rng(r_inf):>12}{f'{u_lat * 1e3:.1f} / {u_exact * 1e3:.1f}':>27}"
                  f"{statistics.median(r_train):>7.2f}{rng(r_train):>12}"
                  + "".join(f"{e:>{width}.1e}" for e, width in zip(errors, (14, 9, 10))), flush=True)
    finally:
        torch.set_num_threads(threads)


def section_training(args) -> None:
    print(f"\n## Training cost at 321×321, batch 1, 21 classes, CPU, {torch.get_num_threads()} threads")
    print("CRF 5 iterations forward+backward as % of the network's forward+backward, timed in interleaved rounds "
          "(network, CRF learned, CRF fixed; the order rotates), each round's own ratio: median (range)")
    image, logits = scene(321, 321, 21)
    crf = MeanFieldCRF(num_classes=21, train_iterations=5, **DENSECRF_PARAMS).train()
    bandwidths = (crf.log_theta_alpha, crf.log_theta_beta, crf.log_theta_gamma)
    z = torch.from_numpy(logits)[None].requires_grad_(True)
    im = torch.from_numpy(image).permute(2, 0, 1)[None].float()

    def crf_step(learn: bool) -> None:
        for p in bandwidths:
            p.requires_grad_(learn)
        crf.zero_grad()
        crf(z, im).square().mean().backward()

    try:
        from crfrnn_deeplab import get_model

        net, name = get_model("deeplabv2_resnet101", num_classes=21).train(), "deeplabv2_resnet101"
    except ImportError:  # the network has not landed
        from torchvision.models.segmentation import deeplabv3_resnet101

        net = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=False).train()
        name = "deeplabv3_resnet101 (stand-in)"
    x = torch.randn(1, 3, 321, 321)

    def net_step() -> None:
        net.zero_grad()
        out = net(x)
        out = out["out"] if isinstance(out, dict) else out
        out.square().mean().backward()

    steps = {"network": net_step, "learned": lambda: crf_step(True), "fixed": lambda: crf_step(False)}
    for fn in steps.values():  # warm-up
        fn()
    rounds = max(3, args.repeats // 2)
    times = timed_rounds(steps, rounds)
    print(f"{'what':<52}{'ms (median)':>12}{'% of network: median (range)':>32}")
    print(f"{name + ' forward+backward':<52}{statistics.median(times['network']) * 1e3:>12.1f}{'100':>32}")
    for key, label in (("learned", "CRF 5 it. fwd+bwd, all parameters learned"),
                       ("fixed", "CRF 5 it. fwd+bwd, bandwidths fixed")):
        share = ratio_range(times[key], times["network"], scale=100, digits=1)
        print(f"{label:<52}{statistics.median(times[key]) * 1e3:>12.1f}{share:>32}")
    print(f"learned / fixed bandwidths, per round: median {ratio_range(times['learned'], times['fixed'])}, "
          f"{rounds} rounds")


def _measure_one(height: int, width: int, classes: int, repeats: int) -> None:
    """Child process: one size, prints JSON {seconds, peak_mib}."""
    image, logits = scene(height, width, classes)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = ours_inference(image, logits, 10)
    seconds = timed(fn, repeats, warmup=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mib": (peak - base) / 1024}))


def _child(height: int, width: int, classes: int, repeats: int, threads: int, malloc: str) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{height},{width},{classes}", "--repeats", str(repeats),
           "--threads", str(threads), "--malloc", malloc]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def section_scaling(args) -> None:
    print(f"\n## Scaling: inference, 10 iterations, CPU, {args.threads} threads, each run in a fresh process")
    print("peak = peak RSS above the inputs; malloc 'retain' = allocator.retain_freed_memory(), 'default' = glibc's")
    print(f"{'size':<12}{'classes':>8}{'malloc':>9}{'ms':>10}{'× previous':>12}{'peak MiB':>10}")
    for malloc in ("retain", "default"):
        previous = None
        for side in (128, 256, 512, 1024):
            r = _child(side, side, 21, max(1, args.repeats // (1 + side // 512)), args.threads, malloc)
            growth = "" if previous is None else f"{r['seconds'] / previous:.2f}"
            print(f"{f'{side}×{side}':<12}{21:>8}{malloc:>9}{r['seconds'] * 1e3:>10.1f}{growth:>12}{r['peak_mib']:>10.0f}")
            previous = r["seconds"]
        r = _child(1024, 2048, 19, 1, args.threads, malloc)
        print(f"{'1024×2048':<12}{19:>8}{malloc:>9}{r['seconds'] * 1e3:>10.1f}{'':>12}{r['peak_mib']:>10.0f}")


def section_cuda(args) -> None:
    if not torch.cuda.is_available():
        print("\n## CUDA: no GPU available, skipped")
        return
    print(f"\n## CUDA ({torch.cuda.get_device_name()}): inference, 10 iterations")
    print(f"{'size':<12}{'classes':>8}{'total ms':>10}{'ms / iteration':>16}{'peak MiB':>10}")
    for h, w, c in ((513, 513, 21), (1024, 2048, 19)):
        image, logits = scene(h, w, c)
        fn10 = ours_inference(image, logits, 10, "cuda")
        fn0 = ours_inference(image, logits, 0, "cuda")
        torch.cuda.reset_peak_memory_stats()
        t10, t0 = timed(fn10, args.repeats, 2), timed(fn0, args.repeats, 2)
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(f"{f'{h}×{w}':<12}{c:>8}{t10 * 1e3:>10.1f}{(t10 - t0) * 100:>16.2f}{peak:>10.0f}")


VOLUME_PARAMS = dict(spatial_weight=3.0, bilateral_weight=10.0, theta_alpha=8.0, theta_beta=0.25, theta_gamma=1.5)


def volume_scene(shape: tuple[int, int, int], num_classes: int = 3, seed: int = 0):
    """A synthetic volume (float32 [D, H, W], one guidance channel) and noisy unary logits (float32 [C, D, H, W])."""
    volume, label = render_volume(np.random.default_rng([seed, 11]), shape)
    rng = np.random.default_rng(seed)
    logits = 2.0 * np.eye(num_classes, dtype=np.float32)[label % num_classes].transpose(3, 0, 1, 2)
    logits += rng.normal(0, 1.5, logits.shape).astype(np.float32)
    return volume, np.ascontiguousarray(logits)


def run_densecrf_volume(volume: np.ndarray, logits: np.ndarray, iterations: int) -> np.ndarray:
    """pydensecrf2's generic DenseCRF with our features: ``p/θγ`` and ``(p/θα, I/θβ)``, positions x (the last
    axis) first, symmetric normalisation, Potts compatibility."""
    import pydensecrf.densecrf as dcrf

    c, n = logits.shape[0], volume.size
    p = VOLUME_PARAMS
    position = np.stack(np.meshgrid(*map(np.arange, volume.shape), indexing="ij")[::-1]).reshape(3, -1)
    spatial = np.ascontiguousarray(position / p["theta_gamma"], dtype=np.float32)
    bilateral = np.concatenate([position / p["theta_alpha"], volume.reshape(1, -1) / p["theta_beta"]])
    crf = dcrf.DenseCRF(n, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-logits.reshape(c, -1)))
    crf.addPairwiseEnergy(spatial, compat=p["spatial_weight"], kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NORMALIZE_SYMMETRIC)
    crf.addPairwiseEnergy(np.ascontiguousarray(bilateral, dtype=np.float32), compat=p["bilateral_weight"],
                          kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    return np.array(crf.inference(iterations)).reshape(logits.shape)


def ours_volume(volume: np.ndarray, logits: np.ndarray, iterations: int):
    crf = MeanFieldCRF(num_classes=logits.shape[0], spatial_dims=3, guidance_groups=(1,), eval_iterations=iterations,
                       **VOLUME_PARAMS).eval()
    z, guidance = torch.from_numpy(logits)[None], torch.from_numpy(volume)[None, None]

    def fn():
        with torch.no_grad():
            return crf(z, guidance)

    return fn


def _measure_volumes(paths: list[str], repeats: int) -> None:
    """Child process: the volumes saved at ``paths`` (drawn by the parent, so that drawing them does not set the
    peak), timed interleaved (a slow stretch of a shared machine hits every size alike); prints JSON
    {seconds: [median per volume], rounds: [every round's seconds, per volume], peak_mib: peak RSS above the loaded
    inputs}. Each round times every volume once, in alternating order."""
    fns = []
    for path in paths:
        scene = np.load(path)
        fns.append(ours_volume(scene["volume"], scene["logits"], 10))
    base = _high_water_mib()
    for fn in fns:
        fn()  # warm-up: the heap reaches its steady size
    times = [[] for _ in fns]
    for r in range(repeats):
        order = list(zip(fns, times))
        for fn, spent in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    print(json.dumps({"seconds": [statistics.median(t) for t in times], "rounds": times,
                      "peak_mib": _high_water_mib() - base}))


def _high_water_mib() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries that over ``execve`` from the forking
    parent, so a child started by a large parent would report the parent's size."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _child_volumes(shapes: list[tuple[int, ...]], classes: int, repeats: int, malloc: str) -> dict:
    """Runs :func:`_measure_volumes` on fresh synthetic volumes of ``shapes`` in a fresh process, one thread."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, shape in enumerate(shapes):
            volume, logits = volume_scene(shape, classes)
            paths.append(f"{tmp}/scene{i}.npz")
            np.savez(paths[-1], volume=volume, logits=logits)
        cmd = [sys.executable, __file__, "--child-volumes", ",".join(paths), "--repeats", str(repeats),
               "--threads", "1", "--malloc", malloc]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def section_volumes(args) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        print("\n## Volumes: 96³, 1 guidance channel, 3 classes, 10 iterations, 1 thread, vs pydensecrf2 DenseCRF")
        print("(the same features; timed in interleaved pairs; ratio = median of the per-pair ratios, with their "
              "range)")
        print(f"{'volume':<14}{'densecrf ms':>13}{'ours ms':>10}{'ratio':>8}{'range':>13}{'mean|ΔQ|':>11}"
              f"{'argmax agree':>14}")
        volume, logits = volume_scene((96, 96, 96))
        fn = ours_volume(volume, logits, 10)
        q = torch.softmax(fn(), 1)[0].numpy()
        ref = run_densecrf_volume(volume, logits, 10)
        t_theirs, t_ours, ratios = timed_pairs(lambda: run_densecrf_volume(volume, logits, 10), fn, args.repeats, 1)
        print(f"{'96×96×96':<14}{t_theirs * 1e3:>13.1f}{t_ours * 1e3:>10.1f}{statistics.median(ratios):>8.2f}"
              f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>13}{np.abs(q - ref).mean():>11.2e}"
              f"{(q.argmax(0) == ref.argmax(0)).mean():>14.4f}")
    finally:
        torch.set_num_threads(threads)

    print(f"\n## Volumes: scaling and memory (ours, 10 iterations, 1 thread, malloc {args.malloc}, fresh processes)")
    print("(the two sizes timed interleaved in one process, in rounds; × 96³ = median of the per-round ratios, with "
          "their range; peak = peak RSS above the loaded inputs)")
    print(f"{'volume':<14}{'voxels':>10}{'ms':>10}{'× 96³':>8}{'range':>13}{'peak MiB':>10}")
    shapes = [(96, 96, 96), (96, 192, 192)]
    r = _child_volumes(shapes, 3, max(5, args.repeats), args.malloc)
    for i, (shape, seconds) in enumerate(zip(shapes, r["seconds"])):
        growth = spread = ""
        if i:
            ratios = [t / t0 for t, t0 in zip(r["rounds"][i], r["rounds"][0])]
            growth, spread = f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"{'×'.join(map(str, shape)):<14}{math.prod(shape):>10}{seconds * 1e3:>10.1f}{growth:>8}{spread:>13}"
              f"{'':>10}")
    r = _child_volumes([(128, 128, 128)], 3, 1, args.malloc)
    print(f"{'128×128×128':<14}{128**3:>10}{r['seconds'][0] * 1e3:>10.1f}{'':>8}{'':>13}{r['peak_mib']:>10.0f}")


SECTIONS = {"accuracy": section_accuracy, "speed": section_speed, "training": section_training,
            "scaling": section_scaling, "cuda": section_cuda, "volumes": section_volumes, "small": section_small}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--malloc", choices=("retain", "default"), default="retain",
                        help="'retain': keep freed memory (allocator.retain_freed_memory, as train.py does)")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="'avx2': rerun in a process whose PyTorch, MKL, oneDNN and FBGEMM use AVX2 code only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-volumes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENVIRONMENT.items()):
        # the libraries read their variable once, when loaded: a new process (its children inherit it)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENVIRONMENT})
    torch.set_num_threads(args.threads)
    if args.malloc == "retain":
        retain_freed_memory()
    if args.child:
        _measure_one(*map(int, args.child.split(",")), args.repeats)
        return
    if args.child_volumes:
        _measure_volumes(args.child_volumes.split(","), args.repeats)
        return
    print(f"torch {torch.__version__}, {args.threads} CPU threads, malloc: {args.malloc}, PyTorch's CPU kernels: "
          f"{torch.backends.cpu.get_cpu_capability()}" + (" (--isa avx2: MKL, oneDNN, FBGEMM AVX2 too)"
                                                           if args.isa == "avx2" else ""))
    for name in args.only or list(SECTIONS):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
