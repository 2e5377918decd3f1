"""The orchestrator's own metrics (Prometheus): jobs by state, the queue, stage calls, retries, real-time factor."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.runtime.telemetry import LATENCY_BUCKETS

JOBS = Gauge("a2v_jobs", "Jobs of this replica now, by state (queued, running)", ["state"])
JOBS_FINISHED = Counter("a2v_jobs_finished_total", "Jobs that ended, by kind and final state", ["kind", "state"])
QUEUE_DEPTH = Gauge("a2v_job_queue_depth", "Jobs waiting for a runner")
JOB_SECONDS = Histogram(
    "a2v_job_seconds",
    "Wall time of jobs that ended, by kind and final state",
    ["kind", "state"],
    buckets=LATENCY_BUCKETS,
)
REAL_TIME_FACTOR = Histogram(
    "a2v_job_real_time_factor",
    "Seconds of wall time per second of rendered video, of render jobs that succeeded (end to end)",
    buckets=(0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0),
)
STAGE_CALL_SECONDS = Histogram(
    "a2v_stage_call_seconds",
    "Duration of the stage calls jobs made, by stage and whether the stage answered from the store",
    ["stage", "cached"],
    buckets=LATENCY_BUCKETS,
)
STAGE_RETRIES = Counter("a2v_stage_retries_total", "Stage calls made again after a retryable failure", ["stage"])
STAGE_FAILURES = Counter(
    "a2v_stage_failures_total", "Stage calls that failed for good, by status code", ["stage", "code"]
)


def watch_manager(manager) -> None:
    """Read the queue depth and the number of running jobs from `manager` at every scrape."""
    QUEUE_DEPTH.set_function(lambda: len(manager.queue))
    JOBS.labels("queued").set_function(lambda: len(manager.queue))
    JOBS.labels("running").set_function(lambda: len(manager.running))
