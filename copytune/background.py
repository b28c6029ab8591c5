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

EXIT_WAIT_S = 10.0  # for a tune in flight at exit; an idle worker is told to stop and leaves at once
IDLE_EXIT_S = 30.0  # an idle worker thread ends; the next submit starts another
_STOP = object()


class BackgroundTuner:
    """``submit(key, plan)`` queues ``work(key, plan)`` for the worker thread (once per key while pending);
    ``wait()`` blocks until nothing is pending."""

    def __init__(self, work: Callable[[str, object], None], name: str = "copytune-tuner"):
        # a bound method is held weakly: the worker thread must not keep its dispatcher (and its Store) alive
        self._work = weakref.WeakMethod(work) if hasattr(work, "__self__") else (lambda: work)
        self._name = name
        self._queue: queue.Queue = queue.Queue()
        self._pending: set[str] = set()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        atexit.register(_stop, weakref.ref(self))

    def submit(self, key: str, plan) -> bool:
        """Queue ``key`` unless it is pending already or the process is exiting; True if queued."""
        with self._idle:  # queued under the lock: an idle worker decides to end under it too
            if key in self._pending or self._stopping:
                return False
            self._pending.add(key)
            self._queue.put((key, plan))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
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
            try:
                item = self._queue.get(timeout=IDLE_EXIT_S)
            except queue.Empty:
                with self._idle:  # idle: end, unless a submit raced in (it sees this thread alive and queued)
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            if item is _STOP:
                return
            key, plan = item
            work = None
            try:
                work = self._work()
                if work is not None and not self._stopping:
                    with self._context(plan.device):
                        work(key, plan)
            except BaseException as exc:  # noqa: BLE001 - a failed tune leaves the interim choice; never the thread
                logger.warning("copytune: background tuning of key %s failed (%s: %s)", key[:12],
                               type(exc).__name__, exc)
            finally:
                del item, plan, work  # the step's tensors and the dispatcher are not kept past the tune
                with self._idle:
                    self._pending.discard(key)
                    self._idle.notify_all()

    def _context(self, device):
        """The key's device and a stream of this thread's own, so the tune never queues behind (or ahead of) a
        serving step's work."""
        if device is None or device.type != "cuda":
            return on_stream(None)
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return on_stream(stream)


def on_stream(stream: torch.cuda.Stream | None):
    """Work on ``stream`` and its device (None: as the thread is). A new thread starts on the current device's
    default stream, and selecting a stream does not select its device."""
    if stream is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.cuda.device(stream.device))
    stack.enter_context(torch.cuda.stream(stream))
    return stack


def _stop(ref) -> None:
    tuner = ref()
    if tuner is None:
        return
    with tuner._idle:
        tuner._stopping = True
        busy = bool(tuner._pending)
    thread = tuner._thread
    if thread is not None and thread.is_alive():
        tuner._queue.put(_STOP)
        if busy:  # a tune in flight: let it end rather than tear it down inside a CUDA call
            thread.join(EXIT_WAIT_S)
