"""SIGTERM / SIGINT (TPU and GKE preemption, Ctrl-C): finish the step, checkpoint, exit 0.
SIGUSR1: write a checkpoint after the current step and go on (a save on demand).

The first stop signal only sets a flag that the loop reads between steps; a second one exits
at once (exit code 128 + signal number), for when the user really means it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("moedpo")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    def __init__(self, backend=None) -> None:
        self.received: int | None = None
        self.save_requested = False
        self.backend = backend
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._save)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _save(self, signum: int, frame) -> None:
        self.save_requested = True
        log.warning("SIGUSR1 received: writing a checkpoint after this step")

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        log.warning("%s received: finishing this step and writing a checkpoint (send it again "
                    "to exit at once)", signal.Signals(signum).name)

    def agree(self) -> None:
        """All ranks adopt a signal any of them received, so they stop at the same step."""
        if self.backend is None or not self.backend.distributed:
            return
        import torch

        flags = self.backend.all_reduce_sum(
            torch.tensor([float(self.received or 0), float(self.save_requested)]))
        if self.received is None and flags[0] > 0:
            self.received = int(signal.SIGTERM)
        self.save_requested = bool(flags[1] > 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
