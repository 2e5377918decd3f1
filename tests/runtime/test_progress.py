"""Progress streaming around a core: events in order, results, errors, and cancellation."""

import threading
import time

import pytest

from services.runtime.errors import Cancelled, InvalidInput
from services.runtime.progress import Finished, stream_progress


class FakeContext:
    """Just the part of grpc.ServicerContext that stream_progress uses."""

    def __init__(self):
        self.callbacks = []

    def add_callback(self, callback):
        self.callbacks.append(callback)
        return True

    def cancel(self):
        for callback in self.callbacks:
            callback()


def counting_core(total, delay=0.0):
    def work(progress, should_stop):
        for done in range(1, total + 1):
            time.sleep(delay)
            progress(done, total)
        return f"{total} frames"

    return work


def test_progress_then_result_with_eta():
    items = list(stream_progress(None, counting_core(5), stage="face", min_interval_seconds=0))
    progress, last = items[:-1], items[-1]
    assert [p.done for p in progress] == [1, 2, 3, 4, 5]
    assert all(p.total == 5 and p.stage == "face" and p.unit == "frames" for p in progress)
    assert progress[-1].eta_seconds == pytest.approx(0.0, abs=1e-6)
    assert progress[0].time.seconds > 0
    assert isinstance(last, Finished) and last.value == "5 frames"


def test_reports_are_rate_limited_but_the_last_one_always_goes_out():
    items = list(stream_progress(None, counting_core(1000), stage="s", min_interval_seconds=10))
    done = [item.done for item in items if not isinstance(item, Finished)]
    assert done == [1, 1000]


def test_core_errors_surface_in_the_caller():
    def failing(progress, should_stop):
        progress(1, 2)
        raise InvalidInput("frame 2 has shape (3,)")

    with pytest.raises(InvalidInput, match=r"shape \(3,\)"):
        list(stream_progress(None, failing, stage="s", min_interval_seconds=0))


def test_client_cancellation_stops_the_core():
    context = FakeContext()
    stopped = threading.Event()

    def endless(progress, should_stop):
        while not should_stop():
            time.sleep(0.01)
        stopped.set()
        raise Cancelled("stopped")

    stream = stream_progress(context, endless, stage="s")
    threading.Timer(0.2, context.cancel).start()
    with pytest.raises(Cancelled):
        list(stream)
    assert stopped.wait(2)


def test_closing_the_stream_early_stops_the_core():
    seen_stop = threading.Event()

    def work(progress, should_stop):
        for done in range(1, 10_000):
            if should_stop():
                seen_stop.set()
                raise Cancelled("stopped")
            progress(done, 10_000)
            time.sleep(0.001)
        return None

    stream = stream_progress(None, work, stage="s", min_interval_seconds=0)
    next(stream)
    stream.close()
    assert seen_stop.wait(2)


def test_stream_events_wraps_progress_and_the_finished_result():
    from audio2video.audio.v1 import audio_pb2
    from services.runtime.progress import stream_events

    events = list(
        stream_events(
            None,
            counting_core(3),
            event=audio_pb2.ExtractEvent,
            stage="audio",
            unit="seconds",
            finish=lambda value: audio_pb2.ExtractResult(source_codec=value),
        )
    )
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"} and events[-2].progress.done == 3
    assert events[-1].result.source_codec == "3 frames"
