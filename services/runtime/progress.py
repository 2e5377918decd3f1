"""Progress streaming and cancellation for long calls: the core runs in a worker, the RPC streams events."""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from audio2video.common.v1 import common_pb2
from services.runtime.errors import Cancelled

T = TypeVar("T")
ProgressCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]


@dataclass
class Finished(Generic[T]):
    """The last item of `stream_progress`: the core's return value."""

    value: T


class ProgressTracker:
    """Turns `(done, total)` callbacks from a core into `common.v1.Progress` messages with an ETA.

    Callbacks are rate-limited (`min_interval_seconds`) so a core may report every frame without
    flooding the stream; the first and the final report always go out.
    """

    def __init__(self, stage: str, unit: str, *, min_interval_seconds: float = 0.25) -> None:
        self.stage = stage
        self.unit = unit
        self.min_interval_seconds = min_interval_seconds
        self.started = time.monotonic()
        self._last_sent = float("-inf")

    def make(self, done: int, total: int, message: str = "") -> common_pb2.Progress:
        """A Progress message with the ETA extrapolated from the time so far."""
        elapsed = time.monotonic() - self.started
        eta = elapsed * (total - done) / done if done > 0 and total > 0 else -1.0
        stamp = Timestamp()
        stamp.GetCurrentTime()
        return common_pb2.Progress(
            stage=self.stage, done=done, total=total, unit=self.unit, eta_seconds=eta, message=message, time=stamp
        )

    def due(self, done: int, total: int) -> bool:
        """Whether a progress event should go out now (the last one always does)."""
        now = time.monotonic()
        if done == total or now - self._last_sent >= self.min_interval_seconds:
            self._last_sent = now
            return True
        return False


def stream_progress(
    context,
    work: Callable[[ProgressCallback, StopCheck], T],
    *,
    stage: str,
    unit: str = "frames",
    min_interval_seconds: float = 0.25,
) -> Iterator[common_pb2.Progress | Finished[T]]:
    """Run `work(progress, should_stop)` in a worker thread; yield Progress messages, then Finished(result).

    When the client cancels or its deadline passes, `should_stop()` turns true so the core can stop
    at its next check (raising `Cancelled`); an exception in the core is re-raised here, in the
    RPC's thread, where the servicer's error mapping turns it into a status.
    """
    tracker = ProgressTracker(stage, unit, min_interval_seconds=min_interval_seconds)
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    if context is not None:
        context.add_callback(stop.set)

    def report(done: int, total: int) -> None:
        if stop.is_set():
            raise Cancelled(f"{stage} cancelled by the caller")
        if tracker.due(done, total):
            events.put(("progress", tracker.make(done, total)))

    def run() -> None:
        try:
            events.put(("result", work(report, stop.is_set)))
        except BaseException as exc:  # re-raised in the RPC thread
            events.put(("error", exc))

    # In the call's context: the core's log lines carry the call's job and request ids, its spans join the trace.
    worker = threading.Thread(target=contextvars.copy_context().run, args=(run,), name=f"{stage}-work", daemon=True)
    worker.start()
    try:
        while True:
            kind, payload = events.get()
            if kind == "progress":
                yield payload
            elif kind == "result":
                yield Finished(payload)
                return
            else:
                raise payload
    finally:
        stop.set()  # the consumer went away (cancelled stream): let the core stop too


def stream_events(
    context,
    work: Callable[[ProgressCallback, StopCheck], T],
    *,
    event: type,
    finish: Callable[[T], object],
    stage: str,
    unit: str = "frames",
) -> Iterator[object]:
    """The body of a streaming RPC: `event(progress=...)` while `work` runs, then `event(result=finish(value))`.

    `finish` stores the outputs and builds the result message; it runs in the RPC's thread.
    """
    for item in stream_progress(context, work, stage=stage, unit=unit):
        if isinstance(item, Finished):
            yield event(result=finish(item.value))
        else:
            yield event(progress=item)
