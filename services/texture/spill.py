"""A long target's candidate crops on local disk, read into a bounded set of resident rows (issue 15).

A target's prepared crops take about 5 bytes per crop pixel in memory (BGR, luminance, voting mask): 135 kB a
frame at 150x180, 2.4 GB for ten minutes at 30 fps, more than a 2 GiB pod. A long target is instead written once
to a scratch file of fixed-size records (the BGR crop and its voting mask as bits: 3.125 bytes a pixel), and
each `synthesize` call reads the rows its candidates need into a `RowCache` of a fixed number of slots: memory
does not grow with the target's length, only the scratch file does.

Records are read with `os.preadv` straight into the cache's slots (no intermediate copy; thread-safe, so the
calls of one replica share a file). The luminance, its sentinel and the mask's holes are derived per loaded row
exactly as `prepare_target` derives them for a whole stack, so textures are bit-identical to the in-memory path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator

import cv2
import numpy as np

from services.runtime.errors import InvalidInput
from services.runtime.frames import FramesReader

DEFAULT_RESIDENT_ROWS = 128
"""Rows a `RowCache` holds by default (5 bytes a crop pixel each: 17 MiB at 150x180). Consecutive output frames
share few candidates of a long target (measured: ~14 of 20 change from frame to frame whatever the cache size),
so a large cache buys little."""


def record_bytes(pixels: int) -> int:
    """Bytes of one frame's record in a spill file: the BGR crop (3 per pixel) and the voting mask as bits."""
    return 3 * pixels + (pixels + 7) // 8


class SpilledFrames:
    """A target's crops and voting masks as a file of records, frame after frame (written by `SpillWriter`).

    Attributes:
        path: The spill file.
        crop_shape: (H, W).
        frame_count: M.
        folder: A folder removed with the file when this object is closed or collected (None = only the file).
    """

    def __init__(self, path: str, crop_shape: tuple[int, int], frame_count: int, *, folder: str | None = None) -> None:
        self.path = str(path)
        self.crop_shape = (int(crop_shape[0]), int(crop_shape[1]))
        self.frame_count = int(frame_count)
        self.pixels = self.crop_shape[0] * self.crop_shape[1]
        self.record = record_bytes(self.pixels)
        size = os.path.getsize(self.path)
        if size != self.record * self.frame_count:
            raise InvalidInput(f"spill file {self.path} holds {size} bytes, not {self.frame_count} records")
        self.fd = os.open(self.path, os.O_RDONLY)
        self._callbacks: list[Callable[[], None]] = []
        self._finalizer = weakref.finalize(self, _remove, self.fd, self.path, folder, self._callbacks)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the spill file."""
        return self.record * self.frame_count

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the file is removed (e.g. to release a scratch reservation)."""
        self._callbacks.append(callback)

    def read_into(self, frame: int, crop: np.ndarray, bits: np.ndarray) -> None:
        """Read frame `frame`'s record into `crop` (uint8, 3P contiguous) and `bits` (uint8, ceil(P / 8))."""
        got = os.preadv(self.fd, [crop, bits], frame * self.record)
        if got != self.record:
            raise InvalidInput(f"spill file {self.path} is short at frame {frame}")

    def close(self) -> None:
        """Close and remove the file (and its folder) now; later reads fail."""
        self._finalizer()


def _remove(fd: int, path: str, folder: str | None, callbacks: list) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)
    for callback in callbacks:
        callback()


class SpillWriter:
    """Appends frames' records to a spill file: `add(crop, mask)` per frame, then `finish()`."""

    def __init__(self, path: str, crop_shape: tuple[int, int]) -> None:
        self.path = str(path)
        self.crop_shape = (int(crop_shape[0]), int(crop_shape[1]))
        self.pixels = self.crop_shape[0] * self.crop_shape[1]
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by finish()
        self.count = 0

    def add(self, crop: np.ndarray, mask: np.ndarray) -> None:
        """Append one frame: uint8 [H, W, 3] BGR crop and [H, W] voting mask (nonzero = votes)."""
        h, w = self.crop_shape
        if crop.shape != (h, w, 3) or mask.shape != (h, w):
            raise InvalidInput(f"frame {self.count}: crop {crop.shape} and mask {mask.shape} are not [{h}, {w}]")
        self._file.write(np.ascontiguousarray(crop, dtype=np.uint8).tobytes())
        self._file.write(np.packbits(mask.reshape(-1) != 0).tobytes())
        self.count += 1

    def finish(self, *, folder: str | None = None) -> SpilledFrames:
        """Close the file and open it for reading."""
        self._file.close()
        return SpilledFrames(self.path, self.crop_shape, self.count, folder=folder)

    def abort(self) -> None:
        """Close and remove a file that will not be finished."""
        self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class RowCache:
    """A bounded LRU of a spilled target's rows, laid out like the in-memory bank's arrays (one row per slot).

    `load(frames)` returns the slot of each frame, reading the missing ones from the spill file (evicting the
    least recently used slots not asked for now); `crops`, `luma` and `masks` are then indexed by slot as the
    bank's arrays are by frame. One cache serves one call (not thread-safe); the file may be shared.

    Attributes:
        crops: uint8 [S, P, 3]. luma: uint8 [S, P] (255 where the mask is 0). masks: uint8 [S, P] 0/1.
        hits, misses: Rows found resident and rows read.
    """

    def __init__(self, frames: SpilledFrames, full_mask: np.ndarray, capacity: int = DEFAULT_RESIDENT_ROWS) -> None:
        self.frames = frames
        self.full_mask = full_mask
        self.capacity = max(1, int(capacity))
        p = frames.pixels
        self.crops = np.empty((self.capacity, p, 3), np.uint8)
        self.luma = np.empty((self.capacity, p), np.uint8)
        self.masks = np.empty((self.capacity, p), np.uint8)
        self._bits = np.empty((frames.record - 3 * p,), np.uint8)
        self._holes: list[np.ndarray] = [np.zeros(0, np.int32)] * self.capacity
        self._slots: OrderedDict[int, int] = OrderedDict()  # frame -> slot, least recently used first
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the resident rows (what this cache holds whatever the target's length)."""
        return self.crops.nbytes + self.luma.nbytes + self.masks.nbytes + sum(h.nbytes for h in self._holes)

    def ensure_capacity(self, rows: int) -> None:
        """Grow to hold at least `rows` rows at once (one frame's candidates must all be resident)."""
        if rows > self.capacity:
            self.__init__(self.frames, self.full_mask, rows)

    def holes(self, slot: int) -> np.ndarray:
        """Pixels of the row in `slot` whose mask is 0 (int32, ascending)."""
        return self._holes[slot]

    def load(self, frames: np.ndarray) -> np.ndarray:
        """Slots (int64, same order) of target frames `frames`, reading those not resident."""
        wanted = [int(f) for f in frames]
        self.ensure_capacity(len(set(wanted)))
        slots = np.empty(len(wanted), np.int64)
        pinned = set(wanted)
        for i, frame in enumerate(wanted):
            slot = self._slots.get(frame)
            if slot is not None:
                self._slots.move_to_end(frame)
                self.hits += 1
            else:
                slot = self._free_slot(pinned)
                self._read(frame, slot)
                self._slots[frame] = slot
                self.misses += 1
            slots[i] = slot
        return slots

    def _free_slot(self, pinned: set[int]) -> int:
        if len(self._slots) < self.capacity:
            return len(self._slots)
        for frame in self._slots:  # least recently used first; the frames asked for now stay
            if frame not in pinned:
                return self._slots.pop(frame)
        raise AssertionError("row cache smaller than one frame's candidates")  # ensure_capacity prevents it

    def _read(self, frame: int, slot: int) -> None:
        h, w = self.frames.crop_shape
        crop, luma, mask = self.crops[slot], self.luma[slot], self.masks[slot]
        self.frames.read_into(frame, crop.reshape(-1), self._bits)
        mask[:] = np.unpackbits(self._bits, count=self.frames.pixels)
        cv2.cvtColor(crop.reshape(h, w, 3), cv2.COLOR_BGR2GRAY, dst=luma.reshape(h, w))
        if self.full_mask[frame]:
            self._holes[slot] = np.zeros(0, np.int32)
        else:
            holes = np.flatnonzero(mask == 0).astype(np.int32)
            luma[holes] = 255
            self._holes[slot] = holes


# ---------------------------------------------------------------------- freeing an archive as it is read
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
PUNCH_STEP = 16 << 20
"""Bytes of an archive read before they are freed at once (`consumed`): what a conversion holds besides its output."""


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of [offset, offset + length) of a file, keeping its size; False where unsupported.

    Linux `fallocate(FALLOC_FL_PUNCH_HOLE)` (ext4, xfs, btrfs, tmpfs: what an emptyDir is); the range then reads as
    zeros.
    """
    if length <= 0:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0


def can_punch_holes(folder: str | None = None) -> bool:
    """Whether files in `folder` (default: the temporary folder) give back the blocks of a punched range."""
    try:
        with tempfile.TemporaryFile(dir=folder) as handle:
            handle.write(b"\1" * (256 << 10))
            handle.flush()
            os.fsync(handle.fileno())
            before = os.fstat(handle.fileno()).st_blocks
            if not punch_hole(handle.fileno(), 0, 256 << 10):
                return False
            return os.fstat(handle.fileno()).st_blocks < before
    except OSError:
        return False


def consumed(path: str, *, step: int = PUNCH_STEP) -> Iterator[np.ndarray]:
    """The frames of the archive at `path` in order, its disk blocks freed behind them as they are read.

    Converting a long target's crop archive into a spill file then needs scratch for the spill file and `step`
    bytes of the archive, not for both whole. Where holes cannot be punched the archive simply stays whole.
    """
    with FramesReader(path) as reader:
        fd = os.open(path, os.O_WRONLY)
        try:
            freed = 0
            for index in range(len(reader)):
                yield reader.read(index)
                if index + 1 < len(reader):
                    upto = reader.member_offset(index + 1) // 4096 * 4096
                    if upto - freed >= step and punch_hole(fd, freed, upto - freed):
                        freed = upto
        finally:
            os.close(fd)
