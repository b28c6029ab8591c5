"""Tuning off the serving path: one daemon thread per dispatcher works through the keys a serving step met but
could not wait for, each on a CUDA stream of its own (never the step's stream), one key at a time.

A serving step that meets a new signature is served at once by an interim choice and hands the key here; the
dispatcher adopts the winner when the tune ends. At interpreter exit no new tune starts, and the one in flight gets
EXIT_WAIT_S to finish (a daemon thread torn down inside a CUDA call can crash the exit).
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable

import torch

from copytune.log import logger

EXIT_WAIT_S = 10.0


class BackgroundTuner:
    """``submit(key, plan)`` queues ``work(key, plan)`` for the worker thread (once per key while pending);
    ``wait()`` blocks until nothing is pending."""

    def __init__(self, work: Callable[[str, object], None], name: str = "copytune-tuner"):
        self._work, self._name = work, name
        self._queue: queue.Queue = queue.Queue()
        self._pending: set[str] = set()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        atexit.register(_stop, weakref.ref(self))

    def submit(self, key: str, plan) -> bool:
        """Queue ``key`` unless it is pending already or the process is exiting; True if queued."""
        with self._idle:
            if key in self._pending or self._stopping:
                return False
            self._pending.add(key)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((key, plan))
        return True

    def pending(self) -> int:
        with self._idle:
            return len(self._pending)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted key is done (tuned or failed); False if ``timeout`` ran out first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def _run(self) -> None:
        while True:
            key, plan = self._queue.get()
            try:
                if not self._stopping:
                    with self._context(plan.device):
                        self._work(key, plan)
            except BaseException as exc:  # noqa: BLE001 - a failed tune leaves the interim choice; never the thread
                logger.warning("copytune: background tuning of key %s failed (%s: %s)", key[:12],
                               type(exc).__name__, exc)
            finally:
                with self._idle:
                    self._pending.discard(key)
                    self._idle.notify_all()

    def _context(self, device):
        """The key's device and a stream of this thread's own, so the tune never queues behind (or ahead of) a
        serving step's work."""
        if device is None or device.type != "cuda":
            return contextlib.nullcontext()
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(device))
        stack.enter_context(torch.cuda.stream(stream))
        return stack


def _stop(ref) -> None:
    tuner = ref()
    if tuner is None:
        return
    with tuner._idle:
        tuner._stopping = True
    thread = tuner._thread
    if thread is not None and thread.is_alive():
        thread.join(EXIT_WAIT_S)
