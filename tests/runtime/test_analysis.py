"""The bounded cache that keeps a target's crops between chunks of one job."""

import threading
import time

import numpy as np

from services.runtime.analysis import BoundedCache


def test_hits_reuse_and_the_budget_evicts_least_recently_used():
    cache = BoundedCache(max_bytes=250)
    loads = []

    def loader(name, n=100):
        return lambda: loads.append(name) or np.zeros(n, np.uint8)

    a = cache.get("a", loader("a"), lambda v: v.nbytes)
    assert cache.get("a", loader("a"), lambda v: v.nbytes) is a
    cache.get("b", loader("b"), lambda v: v.nbytes)
    cache.get("a", loader("a"), lambda v: v.nbytes)  # a is now the most recent
    cache.get("c", loader("c"), lambda v: v.nbytes)  # over budget: b goes
    cache.get("a", loader("a"), lambda v: v.nbytes)
    cache.get("b", loader("b"), lambda v: v.nbytes)
    assert loads == ["a", "b", "c", "b"]
    huge = cache.get("huge", loader("huge", 1000), lambda v: v.nbytes)
    assert huge.nbytes == 1000 and cache.get("huge", loader("huge", 1000), lambda v: v.nbytes) is not huge


def test_concurrent_requests_for_one_key_load_it_once():
    cache = BoundedCache()
    loads = []

    def slow():
        loads.append(1)
        time.sleep(0.2)
        return np.zeros(10)

    threads = [threading.Thread(target=cache.get, args=("k", slow, lambda v: v.nbytes)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == [1]
