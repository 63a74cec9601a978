"""Stopping a run cleanly: SIGINT/SIGTERM become a request the training loop honours at a step boundary,
after saving a checkpoint (:class:`StopRequest`), and :class:`TrainingInterrupted` carries the stop out."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

__all__ = ["StopRequest", "TrainingInterrupted"]

logger = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM (or a step limit such as ``--stop-after``) stopped the run after saving a checkpoint.

    Attributes:
        signum: the signal, or None for a step limit.
        checkpoint: the checkpoint written before stopping.
    """

    def __init__(self, signum: int | None, checkpoint: Path) -> None:
        super().__init__(signum, checkpoint)
        self.signum, self.checkpoint = signum, checkpoint


class StopRequest:
    """SIGINT/SIGTERM ask the training loop to stop: it saves a checkpoint at the next step and exits.

    A second signal of the same kind gets the default behaviour (Ctrl-C twice interrupts at once; the
    checkpoint written last stays intact because writes are atomic). Use as a context manager.

    Attributes:
        signum: the signal received, or None.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        logger.warning("received %s: stopping after the current step", signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None
