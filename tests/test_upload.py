"""Local files into the object store (`a2v stage` @PATH, `a2v run` / `train`): regular files under a size cap,
streamed to a real S3 server (`weed mini`), never read whole into memory."""

import os
import tracemalloc
from pathlib import Path

import pytest

from client.jobs import DEFAULT_UPLOAD_MAX_BYTES, CommandError, upload, upload_limit
from client.stages import call_stage, upload_references
from services.runtime.config import ConfigError
from services.runtime.keys import sha256_file

pytestmark = pytest.mark.integration


def test_a_file_is_streamed_under_its_content_hash_and_stored_once(store, tmp_path, monkeypatch):
    part = store.part_size_bytes
    source = tmp_path / "talk.mp4"
    with open(source, "wb") as handle:
        for _ in range(6):
            handle.write(os.urandom(part))
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole"))
    tracemalloc.start()
    try:
        ref = upload(store, source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * part, f"peak {peak} bytes for a {6 * part}-byte file"
    sha = sha256_file(source)
    assert ref.key == f"uploads/{sha}.mp4" and ref.size_bytes == 6 * part and ref.sha256 == sha
    assert store.stat(ref.key).metadata == {"filename": "talk.mp4"}
    again = upload(store, source)
    assert (again.key, again.sha256) == (ref.key, ref.sha256)


def test_a_file_over_the_limit_is_refused_before_anything_is_stored(store, tmp_path):
    source = tmp_path / "big.wav"
    source.write_bytes(b"\0" * 1001)
    with pytest.raises(CommandError, match=r"big\.wav is 1001 bytes, over the upload limit of 1000 bytes") as info:
        upload(store, source, max_bytes=1000)
    assert info.value.status == 2 and "A2V_UPLOAD_MAX_BYTES" in str(info.value)
    assert store.stat(f"uploads/{sha256_file(source)}.wav", missing_ok=True) is None
    assert upload(store, source, max_bytes=1001).size_bytes == 1001


def test_only_regular_files_are_uploaded(store, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it would block: it must be refused from its stat alone
    for path in (fifo, tmp_path, Path("/dev/zero")):
        with pytest.raises(CommandError, match="not a regular file"):
            upload(store, path)
    with pytest.raises(CommandError, match="no such file"):
        upload(store, tmp_path / "missing.wav")
    link = tmp_path / "link.wav"
    (tmp_path / "real.wav").write_bytes(b"RIFF")
    link.symlink_to(tmp_path / "real.wav")
    assert upload(store, link).size_bytes == 4


def test_the_limit_comes_from_the_environment():
    assert upload_limit({}) == DEFAULT_UPLOAD_MAX_BYTES
    assert upload_limit({"A2V_UPLOAD_MAX_BYTES": "1048576"}) == 1048576
    for bad in ("0", "-5", "lots"):
        with pytest.raises(ConfigError, match="A2V_UPLOAD_MAX_BYTES"):
            upload_limit({"A2V_UPLOAD_MAX_BYTES": bad})


def test_stage_requests_upload_every_reference_within_the_limit(store, tmp_path):
    small, large = tmp_path / "a.wav", tmp_path / "b.mp4"
    small.write_bytes(b"a" * 10)
    large.write_bytes(b"b" * 20)
    request = {"audio": {"key": f"@{small}"}, "frames": [{"key": f"@{large}"}], "note": "@not-a-key"}
    with pytest.raises(CommandError, match=r"b\.mp4 is 20 bytes"):
        upload_references(request, store, max_bytes=15)
    done = upload_references(request, store, max_bytes=20)
    assert done["audio"] == {"key": f"uploads/{sha256_file(small)}.wav", "bucket": store.bucket}
    assert done["frames"][0]["key"] == f"uploads/{sha256_file(large)}.mp4" and done["note"] == "@not-a-key"


def test_a2v_stage_refuses_a_file_over_the_configured_limit_with_a_clear_error(s3_server, tmp_path):
    source = tmp_path / "speech.wav"
    source.write_bytes(b"\0" * 2048)
    environ = {**s3_server.env(), "A2V_UPLOAD_MAX_BYTES": "1024", "A2V_AUDIO_ADDR": "127.0.0.1:9"}
    request = f'{{"audio": {{"key": "@{source}"}}}}'
    with pytest.raises(CommandError, match=r"speech\.wav is 2048 bytes, over the upload limit of 1024 bytes") as info:
        call_stage("audio", "Extract", request, environ=environ)
    assert info.value.status == 2
