"""The bounded cache that keeps a target's crops between chunks of one job, and the identity of an analysis."""

import threading
import time

import numpy as np
import pytest

from audio2video.common.v1 import common_pb2
from services.runtime.analysis import BoundedCache, analysis_sha256, load_manifest
from services.runtime.errors import IntegrityError
from services.runtime.keys import is_sha256
from services.runtime.protos import store_result
from tests.support.analysis import store_analysis


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


@pytest.mark.integration
def test_an_analysis_is_identified_by_its_manifest_and_every_blob_it_names(store, key_prefix):
    """Rewriting the manifest or an array under its key gives another identity, also when refs carry no hash."""
    prefix = f"{key_prefix}/analysis"
    ref = store_analysis(store, prefix, face_valid=np.ones(5, np.uint8), head_motion=np.zeros(5, np.float32))
    manifest = load_manifest(store, ref)
    first = analysis_sha256(store, ref, manifest)
    assert is_sha256(first) and analysis_sha256(store, ref, manifest) == first

    unhashed = type(manifest)()
    unhashed.CopyFrom(manifest)
    unhashed.face_valid.object.sha256 = ""
    store_result(store, ref.key, unhashed)
    by_key = common_pb2.ObjectRef(key=ref.key)
    rewritten_manifest = analysis_sha256(store, by_key, unhashed)
    assert rewritten_manifest != first
    store.put_array(f"{prefix}/face_valid.npy", np.zeros(5, np.uint8))  # the array changes, the manifest does not
    assert analysis_sha256(store, by_key, unhashed) != rewritten_manifest

    # A reference that carries the manifest's hash names that content: a rewritten manifest is not read in its place.
    with pytest.raises(IntegrityError):
        load_manifest(store, ref)
