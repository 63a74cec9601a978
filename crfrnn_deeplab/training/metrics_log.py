"""The run's metric records: ``metrics.jsonl`` (one JSON object a line) and the same scalars for TensorBoard."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from crfrnn_deeplab.files import atomic_write, naming_the_file

__all__ = ["MetricsWriter", "MetricsLogError", "kept_records"]

logger = logging.getLogger(__name__)


class MetricsLogError(ValueError):
    """``metrics.jsonl`` holds a line that is not one of the run's records (edited by hand, or another file)."""


def kept_records(path: Path, *, stage: int, step: int, evaluation: bool = True) -> tuple[list[str], int]:
    """The lines of the records in ``metrics.jsonl`` at ``path`` up to ``step`` of ``stage`` (that step's
    evaluation only with ``evaluation``; no final record), each ending in a newline, and how many records were
    left out. A torn last line (a kill or a full disk while writing it) is left out too.

    Raises:
        MetricsLogError: another line is not a JSON object with an int ``stage`` and ``step`` (or a final
            record), naming the file and the line: a resumed run would otherwise drop or misplace it.
    """
    lines = path.read_bytes().split(b"\n")
    torn_at = len(lines) - 1 if lines[-1] else None  # no newline after the last line: its write was cut short
    kept, dropped = [], 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict):
            if number - 1 == torn_at:
                dropped += 1
                continue
            raise MetricsLogError(f"{path}, line {number}: not a JSON record ({raw[:60]!r}), and resuming rewrites "
                                  f"this file; fix or delete that line")
        if record.get("kind") == "final":
            dropped += 1
            continue
        at = (record.get("stage"), record.get("step"))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in at):
            raise MetricsLogError(f"{path}, line {number}: a record without an int 'stage' and 'step' (got "
                                  f"{at[0]!r} and {at[1]!r}), and resuming keeps records by their step; fix or "
                                  f"delete that line")
        if at > (stage, step) or (at == (stage, step) and record.get("kind") == "eval" and not evaluation):
            dropped += 1
        else:
            kept.append(raw.decode("utf-8") + "\n")
    return kept, dropped


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

    def truncate(self, *, stage: int, step: int, evaluation: bool = True) -> int:
        """Drops the records after ``step`` of ``stage`` (a resumed run replays those steps and writes them
        again), the evaluation at ``step`` unless ``evaluation`` (the checkpoint resumed was written before it
        finished: it is done again), and the final records; returns how many were dropped (see
        :func:`kept_records`, which raises the errors)."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = kept_records(self.path, stage=stage, step=step, evaluation=evaluation)
        if dropped or not self.path.read_bytes().endswith(b"\n"):  # (the next record starts a line of its own)
            with atomic_write(self.path) as f:
                f.write("".join(kept).encode("utf-8"))
        return dropped

    def write(self, record: dict[str, Any], *, global_step: int | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with naming_the_file(self.path), self.path.open("a", encoding="utf-8") as f:
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
