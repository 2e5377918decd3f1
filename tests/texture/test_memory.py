"""Texture memory versus target length (issue 15): a long target is spilled to disk and read a few rows at a time.

Synthetic targets with small crops keep these fast; what they pin is that the spilled path gives the in-memory
textures bit for bit, and that what a call holds (traced by tracemalloc, and the rows resident in its cache) does
not grow with the target's length.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from services.runtime.canonical import CANONICAL_TEMPLATE, CanonicalGeometry
from services.runtime.errors import InvalidInput
from services.runtime.frames import FramesReader, encode_frames
from services.texture import core
from services.texture.core import TextureOptions, prepare_spilled_target, prepare_target, synthesize
from services.texture.spill import RowCache, can_punch_holes, consumed, record_bytes

SMALL = CanonicalGeometry.create(crop_size=(40, 48))  # P = 1,920 pixels: long targets stay quick


def synthetic_target(frames: int, *, seed: int = 0):
    """Mouth shapes that open and close (NaN where no face), validity, jaw lines, poses, and a driving track.

    Returns (mouth, valid, jaw, pose, drive): drive is the finite shapes in reverse order, [frames, 20, 2].
    """
    rng = np.random.default_rng(seed)
    mouth = np.broadcast_to(CANONICAL_TEMPLATE[48:68], (frames, 20, 2)).astype(np.float32).copy()
    opening = 0.03 * (1 + np.sin(np.arange(frames) * 0.37))
    mouth[:, 12:, 1] += opening[:, None] * (np.arange(8) >= 4)[None, :]
    mouth += rng.normal(0, 0.002, mouth.shape).astype(np.float32)
    drive = mouth[::-1].copy()
    valid = rng.random(frames) > 0.05
    mouth[~valid] = np.nan
    jaw = np.broadcast_to(CANONICAL_TEMPLATE[:17], (frames, 17, 2)).astype(np.float32).copy()
    jaw += rng.normal(0, 0.004, jaw.shape).astype(np.float32)
    pose = rng.normal(0, 0.05, (frames, 6))
    return mouth, valid, jaw, pose, drive


def frame_stack(frames: int, *, seed: int = 1, geometry: CanonicalGeometry = SMALL):
    """Crops uint8 [F, H, W, 3] and masks [F, H, W] (every third frame has its right edge unrendered)."""
    rng = np.random.default_rng(seed)
    h, w = geometry.crop_shape
    crops = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    masks = np.ones((frames, h, w), np.uint8)
    masks[::3, :, -5:] = 0
    return crops, masks


def frame_iter(frames: int, *, geometry: CanonicalGeometry = SMALL):
    """The same kind of frames one at a time (a long target never held whole)."""
    h, w = geometry.crop_shape
    base = np.random.default_rng(2).integers(0, 256, (97, h, w, 3), dtype=np.uint8)
    mask = np.ones((h, w), np.uint8)
    holed = mask.copy()
    holed[:, -5:] = 0
    return (base[i % 97] for i in range(frames)), (holed if i % 3 == 0 else mask for i in range(frames))


@pytest.mark.parametrize(
    "options",
    [
        TextureOptions(),
        TextureOptions(median_region="mouth"),
        TextureOptions(median_mode="per_channel"),
        TextureOptions(detail_amount=0.0, pose_tolerance_degrees=0.0),
    ],
)
def test_spilled_target_gives_the_in_memory_textures_bit_for_bit(tmp_path, options):
    frames = 300
    mouth, valid, jaw, pose, drive = synthetic_target(frames)
    crops, masks = frame_stack(frames)
    memory = prepare_target(mouth, valid, crops, masks, SMALL, jaw_lines=jaw, head_pose=pose)
    spilled = prepare_spilled_target(
        mouth, valid, iter(crops), iter(masks), SMALL, str(tmp_path), jaw_lines=jaw, head_pose=pose
    )
    assert spilled.spilled and not memory.spilled
    assert np.array_equal(memory.full_mask, spilled.full_mask) and not memory.full_mask.all()
    retiming = np.arange(frames) % frames
    a = synthesize(memory, drive, 10, 70, options=options, retiming_map=retiming)
    # Few resident rows: the cache evicts and reads rows again, and the textures must not change.
    b = synthesize(spilled, drive, 10, 70, options=options, retiming_map=retiming, resident_rows=options.n_candidates)
    assert np.array_equal(a.textures, b.textures)
    assert np.array_equal(a.texture_masks, b.texture_masks)
    assert np.array_equal(a.candidates, b.candidates) and np.array_equal(a.valid, b.valid)


def test_spill_file_goes_with_its_bank(tmp_path):
    frames = 20
    mouth, valid, _, _, _ = synthetic_target(frames)
    crops, masks = frame_stack(frames)
    folder = tmp_path / "spill"
    folder.mkdir()
    bank = prepare_spilled_target(mouth, valid, iter(crops), iter(masks), SMALL, str(folder))
    assert (folder / "crops.spill").stat().st_size == frames * record_bytes(48 * 40)
    released = []
    bank.spill.on_close(lambda: released.append(True))
    del bank
    import gc

    gc.collect()
    assert not folder.exists() and released == [True]


def test_spilled_target_refuses_a_wrong_number_of_frames(tmp_path):
    mouth, valid, _, _, _ = synthetic_target(10)
    crops, masks = frame_stack(12)
    with pytest.raises(InvalidInput, match="more crops"):
        prepare_spilled_target(mouth, valid, iter(crops), iter(masks), SMALL, str(tmp_path))
    with pytest.raises(InvalidInput, match="8 crops"):
        prepare_spilled_target(mouth, valid, iter(crops[:8]), iter(masks[:8]), SMALL, str(tmp_path))
    assert not (tmp_path / "crops.spill").exists()  # an aborted spill leaves nothing behind


def test_frames_reader_reads_an_archive_from_disk_one_frame_at_a_time(tmp_path):
    crops, masks = frame_stack(7)
    path = tmp_path / "crops.zip"
    path.write_bytes(encode_frames(crops))
    (tmp_path / "masks.zip").write_bytes(encode_frames(masks))
    with FramesReader(str(path)) as reader:
        assert reader.shape == crops.shape and len(reader) == 7
        assert np.array_equal(np.stack(list(reader)), crops)
        assert np.array_equal(reader.read(3), crops[3])
        with pytest.raises(InvalidInput):
            reader.read(7)
    with FramesReader(str(tmp_path / "masks.zip")) as reader:
        assert np.array_equal(np.stack(list(reader)), masks)
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(InvalidInput, match="not a frame archive"):
        FramesReader(str(tmp_path / "bad.zip"))


def _traced_peak(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        value = fn()
        return value, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_memory_of_a_spilled_target_does_not_grow_with_its_length(tmp_path):
    """Preparing a long target streams it to disk, and synthesis holds a fixed number of rows, whatever M."""
    pixels = 48 * 40
    chunk, rows = 30, 40
    peaks = {}
    for frames in (1_000, 12_000):
        mouth, valid, jaw, pose, drive = synthetic_target(frames, seed=frames)
        crops, masks = frame_iter(frames)
        folder = tmp_path / str(frames)
        folder.mkdir()
        bank, prepare_peak = _traced_peak(
            lambda m=mouth, v=valid, c=crops, k=masks, f=folder, j=jaw, p=pose: prepare_spilled_target(
                m, v, c, k, SMALL, str(f), jaw_lines=j, head_pose=p
            )
        )
        chunk_result, synth_peak = _traced_peak(
            lambda b=bank, d=drive[: 2 * chunk]: synthesize(b, d, chunk, 2 * chunk, resident_rows=rows)
        )
        assert chunk_result.frames_written == chunk
        peaks[frames] = (prepare_peak, synth_peak, bank.nbytes)
    in_memory_bank = 12_000 * pixels * 5  # crops, luminance and masks of the long target: 115 MB
    prepare_long, synth_long, bank_long = peaks[12_000]
    # Preparing: the per-frame arrays (shapes, poses, jaw lines, flags: ~650 B a frame), never the crops.
    assert prepare_long < 12_000 * 1_000 < in_memory_bank / 9
    assert bank_long < 12_000 * 700
    # Synthesis: the resident rows, the chunk's textures and the candidate search's [rows, V] distances (a few
    # float64 temporaries, at most `core._BLOCK_ELEMENTS` elements each); never the target's crops.
    distances = 5 * 8 * 12_000 * (chunk + 8)
    assert synth_long < rows * pixels * 5 + chunk * pixels * 4 + distances + (2 << 20) < in_memory_bank / 4
    # What grows from 1,000 to 12,000 frames is only those distances.
    assert synth_long - peaks[1_000][1] < 5 * 8 * 11_000 * (chunk + 8)


def test_row_cache_holds_at_most_its_capacity(tmp_path):
    frames = 400
    mouth, valid, _, _, _ = synthetic_target(frames)
    crops, masks = frame_iter(frames)
    bank = prepare_spilled_target(mouth, valid, crops, masks, SMALL, str(tmp_path))
    cache = RowCache(bank.spill, bank.full_mask, capacity=25)
    rng = np.random.default_rng(0)
    reference_crops, _ = frame_iter(frames)
    expected = np.stack(list(reference_crops)).reshape(frames, -1, 3)
    for _ in range(50):
        wanted = rng.choice(frames, 20, replace=False)
        slots = cache.load(wanted)
        assert len(cache._slots) <= 25 and slots.max() < 25
        assert np.array_equal(cache.crops[slots], expected[wanted])
    assert cache.hits + cache.misses == 50 * 20 and cache.misses < 50 * 20
    cache.load(np.arange(30))  # one frame's candidates never exceed the cache: it grows to hold them
    assert cache.capacity == 30


def test_in_memory_bank_reads_rows_directly():
    """The in-memory path has no cache: slots are the target's frame numbers (no copy, no extra work)."""
    mouth, valid, _, _, _ = synthetic_target(30)
    crops, masks = frame_stack(30)
    bank = prepare_target(mouth, valid, crops, masks, SMALL)
    rows = core._Rows(bank)
    frames = np.array([3, 1, 2])
    assert rows.slots(frames) is frames and rows.cache is None


def test_an_archive_read_in_order_is_freed_behind_the_reader(tmp_path):
    """Converting a crop archive into a spill file needs scratch for the spill file, not for both whole."""
    crops, _ = frame_stack(200)
    path = tmp_path / "crops.zip"
    path.write_bytes(encode_frames(crops, compression=0))  # ~5.8 kB a frame: 1.1 MB
    before = path.stat().st_blocks
    frames = consumed(str(path), step=64 << 10)
    assert np.array_equal(np.stack([next(frames) for _ in range(150)]), crops[:150])
    if not can_punch_holes(str(tmp_path)):
        pytest.skip("the temporary folder's file system cannot punch holes")
    assert path.stat().st_blocks < before * 0.35  # three quarters read: most of them freed
    assert np.array_equal(np.stack(list(frames)), crops[150:])  # the rest still reads
    assert path.stat().st_size > 1_000_000  # the size stays (holes read as zeros)


def test_kept_spilled_targets_give_way_to_a_new_one(tmp_path):
    """The servicer keeps spilled targets for their next chunks while the scratch folder has room for the others."""
    from services.runtime.config import Resources
    from services.texture.servicer import TextureServicer, TextureSettings, _release

    servicer = TextureServicer(None, settings=TextureSettings(resources=Resources(scratch_bytes=10 << 20)))
    mouth, valid, _, _, _ = synthetic_target(50)
    crops, masks = frame_stack(50)
    for name in ("old", "busy"):
        folder = tmp_path / name
        folder.mkdir()
        bank = prepare_spilled_target(mouth, valid, iter(crops), iter(masks), SMALL, str(folder))
        held = servicer.scratch.reserve(4 << 20, name)
        held.__enter__()
        bank.spill.on_close(lambda h=held: _release(servicer.scratch, h))
        servicer.spilled[name] = bank
    in_use = servicer.spilled["busy"]  # a call still reads this one
    del bank
    assert servicer.scratch.used == 8 << 20
    servicer._make_room(1 << 20)  # 1 MiB of the 9 free: nothing goes
    assert list(servicer.spilled) == ["old", "busy"]
    servicer._make_room(4 << 20)
    assert list(servicer.spilled) == ["busy"] and not (tmp_path / "old").exists()
    assert servicer.scratch.used == 4 << 20
    servicer._make_room(9 << 20)  # the busy one leaves the list but keeps its file while it is read
    assert not servicer.spilled and (tmp_path / "busy").exists() and servicer.scratch.used == 4 << 20
    del in_use
    assert not (tmp_path / "busy").exists() and servicer.scratch.used == 0
