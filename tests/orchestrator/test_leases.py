"""One owner per job (issue 15): leases taken and renewed by compare-and-swap in the real S3 server, takeover of an
expired one, and model versions reserved atomically."""

import threading
import time
import uuid

import pytest

from orchestrator.leases import Leases
from services.lipsync.versions import reserve_version

pytestmark = pytest.mark.integration


def test_one_replica_holds_a_job_until_its_lease_expires_then_another_takes_it_over(store):
    job = uuid.uuid4().hex[:20]
    first, second = Leases(store, "replica-a", ttl_seconds=1.0), Leases(store, "replica-b", ttl_seconds=1.0)
    assert first.acquire(job) and not second.acquire(job)
    assert first.renew(job) and second.holder(job).owner == "replica-a"
    time.sleep(1.1)  # replica-a stopped renewing (it died)
    assert second.acquire(job) and second.holder(job).owner == "replica-b"
    assert not first.renew(job)  # a replica that comes back finds its job taken and stops it
    restarted = Leases(store, "replica-b", ttl_seconds=1.0)
    assert restarted.acquire(job)  # the same replica, restarted: its own again at once
    restarted.release(job)  # ended: free for anyone at once
    assert restarted.holder(job).expired() and first.acquire(job)


def test_of_replicas_racing_for_a_free_job_exactly_one_wins(store):
    job = uuid.uuid4().hex[:20]
    won = []

    def race(index: int) -> None:
        if Leases(store, f"replica-{index}").acquire(job):
            won.append(index)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and Leases(store, "x").holder(job).owner == f"replica-{won[0]}"


def test_trainings_finishing_at_once_reserve_different_versions(store):
    speaker = f"s{uuid.uuid4().hex[:8]}"
    versions = []
    threads = [threading.Thread(target=lambda: versions.append(reserve_version(store, speaker))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(versions) == [1, 2, 3, 4, 5, 6]
    assert reserve_version(store, speaker, at_least=10) == 10
