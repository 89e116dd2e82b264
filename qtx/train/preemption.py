"""Stopping a run cleanly on SIGTERM / SIGINT (preemption, ``scancel``, Ctrl-C).

One process: the signal only sets a flag; the loop sees it after the current step, saves a
checkpoint at that step and returns, so a rerun continues with identical losses. A second
SIGINT while stopping interrupts at once. Several processes: JAX's distributed runtime owns
SIGTERM and its preemption sync point (``CheckpointManager.reached_preemption``, orbax's
preemption support) makes every process stop after the same step; no handler is installed
there, since a process that stops alone would leave the others waiting.
"""

from __future__ import annotations

import signal
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager: ``requested(step, manager)`` tells whether to save and stop."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "preemption"

    def requested(self, step: int, manager) -> bool:
        if self.signum is not None:
            return True
        return jax.process_count() > 1 and bool(manager.reached_preemption(step))
