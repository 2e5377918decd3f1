"""Deterministic keys and content hashes."""

import hashlib

import pytest

from services.runtime.errors import InvalidInput
from services.runtime.keys import canonical_json, content_key, derive_key, sha256_bytes, sha256_file, validate_key

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()


def test_same_inputs_and_params_give_the_same_key_regardless_of_dict_order():
    first = derive_key("face", "analysis.json", inputs=[SHA_A], params={"crop": 128, "smooth": 0.5})
    second = derive_key("face", "analysis.json", inputs=[SHA_A], params={"smooth": 0.5, "crop": 128})
    assert first == second
    assert first.startswith("face/") and first.endswith("/analysis.json")


@pytest.mark.parametrize(
    "change",
    [
        {"inputs": [SHA_B]},
        {"params": {"crop": 256, "smooth": 0.5}},
        {"version": 2},
        {"inputs": [SHA_A, SHA_B]},
    ],
)
def test_any_change_of_inputs_params_or_version_changes_the_key(change):
    base = {"inputs": [SHA_A], "params": {"crop": 128, "smooth": 0.5}, "version": 1}
    assert derive_key("face", "a.json", **base) != derive_key("face", "a.json", **(base | change))


def test_input_order_matters():
    assert derive_key("k", "n", inputs=[SHA_A, SHA_B]) != derive_key("k", "n", inputs=[SHA_B, SHA_A])


def test_inputs_must_be_sha256_and_params_finite():
    with pytest.raises(InvalidInput, match="not a sha256"):
        derive_key("k", "n", inputs=["abc"])
    with pytest.raises(InvalidInput, match="not finite"):
        derive_key("k", "n", params={"x": float("nan")})


def test_canonical_json_is_compact_and_sorted():
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_content_key_and_hashes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 3_000_000)
    assert sha256_file(path) == sha256_bytes(b"a" * 3_000_000)
    assert content_key("uploads", SHA_A, ".wav") == f"uploads/{SHA_A}.wav"


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "a/./b", "sp ace", "a/b/", "x" * 1025, "ü"])
def test_unsafe_keys_are_rejected(key):
    with pytest.raises(InvalidInput):
        validate_key(key)


def test_ordinary_keys_pass():
    assert validate_key("jobs/abc-1/out_v1.mp4") == "jobs/abc-1/out_v1.mp4"


def test_derive_prefix_is_the_folder_of_derive_key():
    from services.runtime.keys import derive_prefix

    prefix = derive_prefix("audio", inputs=[SHA_A], params={"x": 1})
    assert derive_key("audio", "features.npy", inputs=[SHA_A], params={"x": 1}) == f"{prefix}/features.npy"
