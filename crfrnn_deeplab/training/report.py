"""The final comparison: a markdown table of evaluation summaries, the text around it, and ``results.json`` /
``results.md`` with everything behind it."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crfrnn_deeplab.files import atomic_write

__all__ = ["format_table", "format_report", "save_results"]


def format_table(rows: dict[str, dict[str, Any]], *, widths: Sequence[int] = (2, 5, 10)) -> str:
    """A markdown table of evaluation summaries (percent): mIoU, pixel accuracy, mean class accuracy,
    frequency-weighted IoU and the boundary-band mIoUs."""
    columns = [(" mIoU", "miou"), ("pixel acc", "pixel_acc"), ("mean acc", "mean_class_acc"), (" fwIoU", "fwiou")]
    columns += [(f"mIoU {w}px band", f"boundary_miou_{w}px") for w in widths]
    name_width = max(len("model"), *(len(n) for n in rows))
    lines = [
        f"| {'model':<{name_width}} | " + " | ".join(title for title, _ in columns) + " |",
        f"|{'-' * (name_width + 2)}|" + "|".join("-" * (len(t) + 1) + ":" for t, _ in columns) + "|",
    ]
    for name, r in rows.items():
        cells = []
        for title, key in columns:
            value = r.get(key, math.nan)
            cells.append(f"{100 * value:>{len(title)}.2f}")
        lines.append(f"| {name:<{name_width}} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(
    results: dict[str, dict[str, Any]],
    *,
    dataset: str,
    images: int,
    crf_iterations: int,
    minutes: float,
    grid: dict[str, Any] | None,
    spatial_weight: float,
    theta_gamma: float,
    learned: dict[str, Any] | None,
) -> str:
    """The table with a title line, the grid-searched CRF's parameters (``grid``: the baseline's record, with
    the fixed spatial kernel ``spatial_weight``, ``theta_gamma``) and the learned bandwidths (``learned``)."""
    lines = [f"Validation: {dataset}, {images} images, {crf_iterations} mean-field iterations; {minutes:.1f} min",
             "", format_table(results), ""]
    if grid is not None:
        p = grid["params"]
        lines.append(f"Grid-searched CRF ({len(grid['trials'])} combinations on {grid['held_out_images']} held-out "
                     f"images): bilateral weight {p['bilateral_weight']:g}, θα {p['theta_alpha']:g}, "
                     f"θβ {p['theta_beta']:g} (spatial weight {spatial_weight:g}, θγ {theta_gamma:g})"
                     + (f"; on the edge of the grid in {', '.join(grid['at_edge'])}." if grid.get("at_edge") else "."))
    if learned is not None:
        lines.append(f"Learned CRF bandwidths: θα {learned['theta_alpha']:.3g}, θβ {learned['theta_beta']:.3g}, "
                     f"θγ {learned['theta_gamma']:.3g}.")
    return "\n".join(lines)


def save_results(out_dir: Path, text: str, *, results: dict[str, dict[str, Any]], class_names: Sequence[str],
                 grid: dict[str, Any] | None, learned: dict[str, Any] | None, minutes: float,
                 config: dict[str, Any]) -> None:
    """Writes ``results.md`` (``text``) and ``results.json`` (every row with per-class IoU, the grid search's
    trials, the learned CRF, the resolved config) to ``out_dir``, each atomically (:func:`atomic_write`).

    Raises:
        OSError: naming the file that could not be written (e.g. a full disk)."""
    payload = {"results": results, "class_names": list(class_names), "grid_search": grid, "learned_crf": learned,
               "minutes": minutes, "config": config}
    # whole or not at all: a full disk or a kill while writing leaves a previous run's (a resumed run's) files
    files = {"results.json": json.dumps(payload, indent=2), "results.md": text + "\n"}
    for name, content in files.items():
        with atomic_write(out_dir / name) as f:
            f.write(content.encode("utf-8"))
