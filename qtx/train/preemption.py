"""Stopping a run cleanly on SIGTERM / SIGINT (preemption, ``scancel``, Ctrl-C).

One process: the signal only sets a flag; the loop sees it after the current step, saves a
checkpoint at that step and returns, so a rerun continues with identical losses. A second
SIGINT while stopping interrupts at once.

Several processes: every process must stop after the same step, or the others would wait in
a collective. JAX's distributed runtime owns SIGTERM: its preemption notice reaches the
coordination service, which picks one step for all (``CheckpointManager.reached_preemption``,
orbax's preemption support). SIGINT is turned into that notice: the handler records the
signal's name for the others (``distributed.announce_signal``) and sends this process a
SIGTERM. Every process then saves at the same step and prints the same line.
"""

from __future__ import annotations

import os
import signal
import threading

import jax

from qtx.train import distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager: ``requested(step, manager)`` tells whether to save and stop."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._several = False

    def __enter__(self) -> StopOnSignal:
        self._several = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            # several processes: SIGTERM stays with JAX's preemption notifier
            for sig in (signal.SIGINT,) if self._several else SIGNALS:
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
        if self._several:
            distributed.announce_signal(signal.Signals(signum).name)
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notice

    @property
    def name(self) -> str:
        if self.signum is not None:
            return signal.Signals(self.signum).name
        return distributed.announced_signal() if self._several else "SIGTERM"

    def requested(self, step: int, manager) -> bool:
        if self._several:  # the step the coordination service picked, on every process
            return bool(manager.reached_preemption(step))
        return self.signum is not None
