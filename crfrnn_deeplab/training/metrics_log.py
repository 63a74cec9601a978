"""The run's metric records: ``metrics.jsonl`` (one JSON object a line) and the same scalars for TensorBoard."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter"]

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` and, when the ``tensorboard`` package is importable, mirrors
    the numbers to TensorBoard (tag ``stage<N>/<kind>/<key path>``). Only enabled on rank 0.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                logger.debug("tensorboard not installed: metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def truncate(self, *, stage: int, step: int) -> int:
        """Drops the records after ``step`` of ``stage`` (a resumed run replays those steps and writes them
        again) and the final records; returns how many were dropped. A torn last line is dropped too."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                dropped += 1
                continue
            at = (record.get("stage", 0), record.get("step", 0))
            if record.get("kind") == "final" or "stage" not in record or at > (stage, step):
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text("".join(kept), encoding="utf-8")
            temporary.replace(self.path)
        return dropped

    def write(self, record: dict[str, Any], *, global_step: int | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None and global_step is not None:
            prefix = f"stage{record.get('stage', 0)}/{record.get('kind', 'train')}"
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key not in ("time", "step", "stage"):
                    self._tb.add_scalar(f"{prefix}/{key}", value, global_step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            out[f"{prefix}{key}"] = value
    return out
