"""The blob store against a real S3 server (`weed mini`) through the minio SDK."""

import dataclasses
import io
import os
import threading
import zipfile

import numpy as np
import pytest

from services.runtime.blobstore import BlobStore, npz_bytes, wait_for_store
from services.runtime.config import StoreConfig
from services.runtime.errors import (
    FailedPrecondition,
    Forbidden,
    IntegrityError,
    InvalidInput,
    NotFound,
    TooLarge,
    Unavailable,
)
from services.runtime.frames import encode_frames
from services.runtime.keys import derive_key, sha256_bytes

pytestmark = pytest.mark.integration


def test_20_mb_round_trip_through_multipart_upload(store, key_prefix, tmp_path):
    data = os.urandom(20 * 1024 * 1024)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    ref = store.put_file(f"{key_prefix}/big.bin", source)  # 5 MiB parts: a 4-part upload
    assert ref.size_bytes == len(data) and ref.sha256 == sha256_bytes(data)
    assert store.get_bytes(ref.key) == data
    target = tmp_path / "out" / "big.bin"
    store.get_file(ref.key, target)
    assert target.read_bytes() == data


def test_metadata_round_trip(store, key_prefix):
    ref = store.put_bytes(
        f"{key_prefix}/m.json", b"{}", content_type="application/json", metadata={"speaker": "obama", "fps": "29.97"}
    )
    stat = store.stat(ref.key)
    assert stat.metadata == {"speaker": "obama", "fps": "29.97"}
    assert stat.sha256 == sha256_bytes(b"{}")
    assert stat.content_type == "application/json"
    assert stat.size_bytes == 2


def test_array_round_trip_keeps_dtype_shape_and_time_base(store, key_prefix):
    features = np.random.default_rng(0).standard_normal((250, 28)).astype(np.float32)
    ref, info = store.put_array(f"{key_prefix}/features.npy", features, fps=100.0, start_seconds=0.005)
    loaded, loaded_info = store.get_array(ref.key)
    np.testing.assert_array_equal(loaded, features)
    assert loaded_info == info
    assert (loaded_info.shape, loaded_info.dtype, loaded_info.fps) == ((250, 28), "float32", 100.0)


def test_named_arrays_round_trip(store, key_prefix):
    arrays = {"landmarks": np.zeros((5, 68, 2), np.float32), "valid": np.array([1, 0, 1, 1, 0], bool)}
    ref = store.put_arrays(f"{key_prefix}/analysis.npz", arrays)
    loaded = store.get_arrays(ref.key)
    assert set(loaded) == {"landmarks", "valid"}
    np.testing.assert_array_equal(loaded["valid"], arrays["valid"])


def test_object_arrays_are_refused(store, key_prefix):
    with pytest.raises(InvalidInput, match="object arrays"):
        store.put_array(f"{key_prefix}/o.npy", np.array([{"a": 1}], dtype=object))


def test_missing_key_is_not_found_naming_the_object(store, key_prefix):
    with pytest.raises(NotFound, match=f"{key_prefix}/nothing.bin"):
        store.get_bytes(f"{key_prefix}/nothing.bin")
    with pytest.raises(NotFound):
        store.stat(f"{key_prefix}/nothing.bin")
    assert store.stat(f"{key_prefix}/nothing.bin", missing_ok=True) is None
    assert not store.exists(f"{key_prefix}/nothing.bin")


def test_missing_and_invalid_buckets(s3_server, key_prefix):
    config = dataclasses.replace(s3_server.config(), allowed_buckets=("no-such-bucket", "B"))
    store = BlobStore.from_config(config)
    with pytest.raises(NotFound, match="bucket not found: no-such-bucket"):
        store.get_bytes("k.bin", bucket="no-such-bucket")
    with pytest.raises(InvalidInput, match="invalid bucket name"):
        store.get_bytes("k.bin", bucket="B")


def test_a_bucket_other_than_the_services_own_is_refused_before_the_store_is_asked(store, key_prefix):
    ref = store.put_bytes(f"{key_prefix}/mine.bin", b"mine")
    for bucket in ("other", "no-such-bucket"):
        with pytest.raises(Forbidden, match=f"bucket '{bucket}' is not one this service uses"):
            store.get_bytes(ref.key, bucket=bucket)
        with pytest.raises(Forbidden):
            store.put_bytes(f"{key_prefix}/theirs.bin", b"x", bucket=bucket)
        with pytest.raises(Forbidden):
            store.stat(ref.key, bucket=bucket, missing_ok=True)
    assert store.get_bytes(ref.key, bucket=store.bucket) == b"mine" == store.get_bytes(ref.key)


def test_corrupted_object_is_detected_and_not_returned(store, key_prefix):
    ref = store.put_bytes(f"{key_prefix}/c.bin", b"original content")
    # Damage at rest: new bytes under the key while the recorded sha256 stays the old one.
    damaged = b"0riginal content"
    store.client.put_object(store.bucket, ref.key, io.BytesIO(damaged), len(damaged), metadata={"sha256": ref.sha256})
    with pytest.raises(IntegrityError, match="corrupt"):
        store.get_bytes(ref.key)
    with pytest.raises(IntegrityError):
        store.get_file(ref.key, "/tmp/never-written.bin")
    assert not os.path.exists("/tmp/never-written.bin")


def test_expected_hash_from_a_reference_is_checked(store, key_prefix):
    ref = store.put_bytes(f"{key_prefix}/e.bin", b"abc")
    assert store.get_bytes(ref.key, expected_sha256=ref.sha256) == b"abc"
    with pytest.raises(IntegrityError, match="expected"):
        store.get_bytes(ref.key, expected_sha256=sha256_bytes(b"other"))


def test_content_addressed_put_is_idempotent(store, key_prefix):
    first = store.put_content_addressed(f"{key_prefix}/uploads", b"same bytes", suffix=".bin")
    second = store.put_content_addressed(f"{key_prefix}/uploads", b"same bytes", suffix=".bin")
    assert first.key == second.key == f"{key_prefix}/uploads/{sha256_bytes(b'same bytes')}.bin"


def test_size_limits(store, key_prefix):
    ref = store.put_bytes(f"{key_prefix}/s.bin", b"x" * 1000)
    with pytest.raises(TooLarge, match="over the limit of 100"):
        store.get_bytes(ref.key, max_bytes=100)
    small = BlobStore(store.client, store.bucket, max_object_bytes=10)
    with pytest.raises(TooLarge):
        small.put_bytes(f"{key_prefix}/t.bin", b"x" * 11)
    assert not store.exists(f"{key_prefix}/t.bin")


def test_a_failed_overwrite_leaves_the_stored_object_intact(store, key_prefix):
    ref = store.put_bytes(f"{key_prefix}/keep.bin", b"precious")
    small = BlobStore(store.client, store.bucket, max_object_bytes=4)
    with pytest.raises(TooLarge):
        small.put_bytes(ref.key, b"replacement that is too big")
    with pytest.raises(InvalidInput):
        store.put_bytes(ref.key, b"x", metadata={"note": "naïve"})
    assert store.get_bytes(ref.key) == b"precious"


def test_wrong_credentials_are_a_clear_failed_precondition(s3_server, key_prefix):
    config = s3_server.config()
    bad = BlobStore.from_config(StoreConfig(config.endpoint, config.access_key, "wrong-secret", bucket=config.bucket))
    with pytest.raises(FailedPrecondition, match="refused the credentials"):
        bad.get_bytes(f"{key_prefix}/x.bin")


def test_unreachable_store_is_unavailable_quickly():
    from tests.conftest import free_port

    store = BlobStore.from_config(StoreConfig(f"127.0.0.1:{free_port()}", "k", "s"))
    with pytest.raises(Unavailable, match="unreachable"):
        store.get_bytes("a.bin")
    with pytest.raises(Unavailable):
        wait_for_store(store, timeout_seconds=0.5, poll_seconds=0.1)


def test_unsafe_keys_never_reach_the_server(store):
    with pytest.raises(InvalidInput):
        store.put_bytes("../escape", b"x")


# -- one key, several writers (issue 15: identical jobs at once) --------------------------------------------------


def derived(key_prefix: str, name: str) -> str:
    return derive_key("test", name, params={"prefix": key_prefix})


def test_a_derived_key_is_written_once_and_later_writers_reuse_the_first_object(store, key_prefix, tmp_path):
    key = derived(key_prefix, "textures.frames.zip")
    first = store.put_bytes(key, b"first writer's bytes")
    second = store.put_bytes(key, b"second writer's different bytes")
    assert second.sha256 == first.sha256 and second.size_bytes == first.size_bytes
    assert store.get_bytes(key, expected_sha256=second.sha256) == b"first writer's bytes"
    # Over one part (5 MiB here): a multipart upload whose completion is conditional.
    big = derived(key_prefix, "segment.mp4")
    path = tmp_path / "big.bin"
    path.write_bytes(b"a" * (11 * 1024 * 1024))
    kept = store.put_file(big, path)
    path.write_bytes(b"b" * (12 * 1024 * 1024))
    again = store.put_file(big, path)
    stored = store.stat(big)
    assert again.sha256 == kept.sha256 == stored.sha256 and again.size_bytes == stored.size_bytes == 11 << 20
    # A key that names no content (a manifest, an output a caller chose) is replaced as before, or on request kept.
    plain = f"{key_prefix}/job.json"
    store.put_bytes(plain, b"1")
    assert store.get_bytes(plain) == b"1" and store.put_bytes(plain, b"2").sha256 == sha256_bytes(b"2")
    assert store.put_bytes(plain, b"3", if_absent=True).sha256 == sha256_bytes(b"2")


def test_writers_racing_on_one_derived_key_all_get_the_stored_object(store, key_prefix):
    key = derived(key_prefix, "race.bin")
    refs = [None] * 8

    def write(index: int) -> None:
        refs[index] = store.put_bytes(key, bytes([index]) * 200_000)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = store.get_bytes(key)
    assert {ref.sha256 for ref in refs} == {sha256_bytes(stored)}  # one winner, and every writer names it


def test_a_reader_reads_again_when_the_object_was_rewritten_under_it(store, key_prefix, tmp_path):
    key = f"{key_prefix}/rewritten.bin"  # not derived: overwritten, as objects written before write-once were
    expected = store.put_bytes(key, b"version the reader was told about").sha256
    store.put_bytes(key, b"a writer's other version")
    threading.Timer(0.2, lambda: store.put_bytes(key, b"version the reader was told about")).start()
    assert store.get_bytes(key, expected_sha256=expected) == b"version the reader was told about"
    store.put_bytes(key, b"a lasting other version")
    with pytest.raises(IntegrityError, match="differs from the expected"):  # once only: then DATA_LOSS
        store.get_file(key, tmp_path / "never", expected_sha256=expected)


def test_archives_do_not_carry_the_clock():
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    for data in (encode_frames(frames), npz_bytes({"a": frames})):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            assert {member.date_time for member in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert encode_frames(frames) == encode_frames(frames.copy())
    np.testing.assert_array_equal(np.load(io.BytesIO(npz_bytes({"a": frames})))["a"], frames)


def test_content_sha256_names_the_content_a_reference_stands_for(store, key_prefix):
    """Derived keys take inputs by content: the reference's hash, else the stored one, else the object's version."""
    from services.runtime.blobstore import BlobRef
    from services.runtime.keys import is_sha256

    stored = store.put_bytes(f"{key_prefix}/ours.bin", b"first")
    claimed = "ab" * 32
    assert store.content_sha256(BlobRef(store.bucket, stored.key, claimed)) == claimed  # the caller's, no stat
    assert store.content_sha256(BlobRef("", stored.key)) == sha256_bytes(b"first")  # recorded by our writers
    with pytest.raises(InvalidInput):
        store.content_sha256(BlobRef(store.bucket, stored.key, "not-a-digest"))

    # Written by another tool, without the sha256 metadata: a stat-based identity that follows the content.
    foreign = f"{key_prefix}/foreign.bin"
    store.client.put_object(store.bucket, foreign, io.BytesIO(b"AAAA"), 4)
    first = store.content_sha256(BlobRef(store.bucket, foreign))
    assert is_sha256(first) and first == store.content_sha256(BlobRef("", foreign))
    store.client.put_object(store.bucket, foreign, io.BytesIO(b"BBBB"), 4)  # same size, same second
    second = store.content_sha256(BlobRef(store.bucket, foreign))
    assert is_sha256(second) and second != first

    with pytest.raises(NotFound):
        store.content_sha256(BlobRef(store.bucket, f"{key_prefix}/missing.bin"))
    with pytest.raises(Forbidden):
        store.content_sha256(BlobRef("some-other-bucket", stored.key))


def test_input_sha256_of_request_references(store, key_prefix):
    from audio2video.common.v1 import common_pb2
    from services.runtime.protos import NO_INPUT, input_sha256

    ref = store.put_bytes(f"{key_prefix}/in.bin", b"input")
    assert input_sha256(store, common_pb2.ObjectRef(key=ref.key)) == ref.sha256
    assert input_sha256(store, common_pb2.ObjectRef(), optional=True) == NO_INPUT
    with pytest.raises(InvalidInput, match="mouth shapes"):
        input_sha256(store, common_pb2.ObjectRef(), what="mouth shapes")
    with pytest.raises(NotFound):
        input_sha256(store, common_pb2.ObjectRef(key=f"{key_prefix}/gone.bin"), optional=True)
