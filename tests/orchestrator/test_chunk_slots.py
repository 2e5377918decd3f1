"""The render pipeline's chunk slots: at most max_parallel_chunks stage calls at once, composites first."""

from __future__ import annotations

import threading
import time

from audio2video.composite.v1 import composite_pb2
from orchestrator.pipeline import ChunkSlots, confidence_report


def test_slots_bound_the_calls_and_let_composites_go_first():
    slots = ChunkSlots(2)
    busy, peak, order = [0], [0], []
    lock = threading.Lock()
    release = threading.Event()

    def work(name: str, urgent: bool, wait: bool) -> None:
        with slots.hold(urgent=urgent):
            with lock:
                busy[0] += 1
                peak[0] = max(peak[0], busy[0])
                order.append(name)
            if wait:
                release.wait(5)
            with lock:
                busy[0] -= 1

    first = [threading.Thread(target=work, args=(f"texture{i}", False, True)) for i in range(2)]
    for t in first:
        t.start()
    time.sleep(0.1)  # both slots taken
    later = [threading.Thread(target=work, args=("texture2", False, False))]
    later.append(threading.Thread(target=work, args=("composite0", True, False)))
    for t in later:
        t.start()
        time.sleep(0.05)
    release.set()
    for t in first + later:
        t.join(5)
    assert peak[0] == 2
    assert order.index("composite0") < order.index("texture2")  # it waited less, though it came later


def test_confidence_report_sums_the_chunks_and_keeps_the_worst_frames():
    def render(start: int, worst: list[float]) -> composite_pb2.RenderResult:
        return composite_pb2.RenderResult(
            frames_synthesized=10,
            frames_faded=2,
            frames_passthrough=3,
            frames_low_confidence=1,
            lowest_confidence=[
                composite_pb2.FrameConfidence(frame=start + i, confidence=c, reason="yaw") for i, c in enumerate(worst)
            ],
        )

    report = confidence_report([render(0, [0.1, 0.4]), render(100, [0.2] * 12)])
    assert (report["frames_synthesized"], report["frames_faded"], report["frames_passthrough"]) == (20, 4, 6)
    assert report["frames_low_confidence"] == 2
    worst = report["worst_frames"]
    assert len(worst) == 10 and worst[0].frame == 0 and worst[1].confidence == 0.2 and worst[1].frame == 100
