"""What a checkpoint restores (``TrainState``), and how a run is asked to stop (signals).

``state.json`` in each checkpoint is ``TrainState.to_json``: the step, the data stream's position, the
tokens seen, the skipped steps, early stopping's record, and the fingerprints a resume must agree on.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import TunelabError
from .objectives import EarlyStopping
from .stream import Position


@dataclass
class TrainState:
    step: int = 0
    position: Position = field(default_factory=Position)
    tokens_seen: int = 0
    skipped: int = 0  # non-finite steps skipped (train.nonfinite=skip)
    skipped_in_a_row: int = 0
    stopper: EarlyStopping | None = None  # early stopping's record (train.early_stopping_patience)
    stopped_early: int | None = None  # the step early stopping ended the run at (not checkpointed: derived)

    def to_json(self, fingerprint: str, content: str, processes: int) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.position.epoch, "batch": self.position.batch, "micro_step": 0,
                "tokens_seen": self.tokens_seen, "skipped": self.skipped, "skipped_in_a_row": self.skipped_in_a_row,
                "data_fingerprint": fingerprint, "data_content": content, "processes": processes,
                "early_stopping": self.stopper.state() if self.stopper else {}}

    def load_json(self, state: dict[str, Any], total: int) -> None:
        """Take a checkpoint's state.json; ``total``: the run's steps (an early-stopped run stays stopped)."""
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped, self.skipped_in_a_row = state.get("skipped", 0), state.get("skipped_in_a_row", 0)
        self.position = Position(state["epoch"], state["batch"])
        if self.stopper is not None:
            self.stopper.load(state.get("early_stopping", {}))
            if self.stopper.bad >= self.stopper.patience and self.step < total:  # it had stopped early here
                self.stopped_early = self.step


class Interrupted(TunelabError):
    """Training stopped by SIGINT or SIGTERM after finishing a step and checkpointing it."""

    exit_code = 130


class StopRequest:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (a second SIGINT
    stops at once). Clusters that pre-empt jobs send SIGTERM."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\ntunelab: {self.signal}: finishing this step and writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """SIGTERM stops like Ctrl-C (KeyboardInterrupt) while active: outside the step loop, where there is no
    step to finish (loading, evaluating, saving)."""
    def handle(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
