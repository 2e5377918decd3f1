"""Image stacks as blobs: one PNG per frame in an uncompressed zip, so any frame reads alone, bit-exact.

Used for canonical crops and their masks (face), synthesized textures (texture, teeth): the format
every stage shares, so it lives in the runtime rather than in one stage's core.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import BinaryIO

import cv2
import numpy as np

from services.runtime.errors import InvalidInput
from services.runtime.keys import ZIP_EPOCH

FRAMES_FORMAT = "a2v-frames-png/1"
FRAMES_CONTENT_TYPE = "application/x-a2v-frames+zip"


def _member(name: str) -> zipfile.ZipInfo:
    """An archive member without the clock in it: the same frames always give the same bytes."""
    member = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    member.compress_type = zipfile.ZIP_STORED
    return member


class FramesWriter:
    """Writes an `encode_frames` archive one image at a time into a binary file.

    A producer of thousands of frames (a video's crops) holds one PNG at a time instead of the whole stack.

    The header goes last, when the frame count is known; the bytes equal `encode_frames` of the same stack.
    """

    def __init__(self, file: BinaryIO, *, compression: int = 6) -> None:
        if not 0 <= compression <= 9:
            raise InvalidInput(f"compression must be in [0, 9], got {compression}")
        self._archive = zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED)
        self._params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
        self._shape: tuple[int, ...] | None = None
        self.count = 0

    def add(self, image: np.ndarray) -> None:
        """Append one uint8 [h, w] or [h, w, C] image (C in 1, 3, 4); every image has the first one's shape."""
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise InvalidInput(f"frames must be uint8 [h, w] or [h, w, 3], got {arr.dtype} {arr.shape}")
        if self._shape is None:
            self._shape = arr.shape
        elif arr.shape != self._shape:
            raise InvalidInput(f"frame {self.count} has shape {arr.shape}, the archive's frames {self._shape}")
        ok, png = cv2.imencode(".png", arr, self._params)
        if not ok:
            raise InvalidInput(f"frame {self.count} of shape {arr.shape} cannot be PNG-encoded")
        self._archive.writestr(_member(f"{self.count:06d}.png"), png.tobytes())
        self.count += 1

    def __enter__(self) -> FramesWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._archive.fp is not None:  # not finished (the producer failed): close without a header
            self._archive.close()

    def finish(self, *, empty_shape: tuple[int, ...] = (0, 0)) -> tuple[int, ...]:
        """Write the header and close the archive; the stack's shape [F, h, w(, C)] (`empty_shape` if none)."""
        shape = (self.count, *(self._shape if self._shape is not None else empty_shape))
        header = {"format": FRAMES_FORMAT, "shape": list(shape), "dtype": "uint8"}
        self._archive.writestr(_member("header.json"), json.dumps(header))
        self._archive.close()
        return shape


def encode_frames(crops: np.ndarray, *, compression: int = 6) -> bytes:
    """Losslessly compress a stack of images: one PNG per frame in an uncompressed zip.

    The zip holds `000000.png`, `000001.png`, ... so any frame can be read alone, then `header.json`
    ({"format": "a2v-frames-png/1", "shape": [...], "dtype": "uint8"}); the same frames give the same bytes.
    Measured on the shared clips (150 x 180 crops): 30 % of the raw size from 256x256 video, 34 % from 1080p,
    45 % from 512x512; masks ~1 %.

    Args:
        crops: uint8 [F, h, w, 3] BGR or [F, h, w] (e.g. masks).
        compression: PNG (zlib) level 0-9; default 6.

    Returns:
        The archive bytes.

    Raises:
        InvalidInput: wrong dtype or shape.
    """
    arr = np.asarray(crops)
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] not in (1, 3, 4)):
        raise InvalidInput(f"crops must be uint8 [F, h, w] or [F, h, w, 3], got {arr.dtype} {arr.shape}")
    buffer = io.BytesIO()
    writer = FramesWriter(buffer, compression=compression)
    for image in arr:
        writer.add(image)
    writer.finish(empty_shape=arr.shape[1:])
    return buffer.getvalue()


def decode_frames(data: bytes, *, indices: np.ndarray | list[int] | None = None) -> np.ndarray:
    """Read an `encode_frames` archive back, bit-exact.

    Args:
        data: Archive bytes.
        indices: Frames to read (default all), in the order given.

    Returns:
        uint8 [N, h, w, 3] or [N, h, w] (the encoded shape, N = len(indices) or F).

    Raises:
        InvalidInput: not such an archive, corrupt frame, index out of range.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(bytes(data)))
        header = json.loads(archive.read("header.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise InvalidInput(f"not a frame archive: {exc}") from exc
    if header.get("format") != FRAMES_FORMAT:
        raise InvalidInput(f"unknown frame archive format {header.get('format')!r}")
    shape = tuple(int(v) for v in header["shape"])
    order = np.arange(shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
    if order.size and (order.min() < 0 or order.max() >= shape[0]):
        raise InvalidInput(f"crop index out of range [0, {shape[0]})")
    out = np.empty((len(order),) + shape[1:], dtype=np.uint8)
    flag = cv2.IMREAD_UNCHANGED
    for row, i in enumerate(order):
        try:
            png = np.frombuffer(archive.read(f"{int(i):06d}.png"), dtype=np.uint8)
        except KeyError as exc:
            raise InvalidInput(f"frame archive lacks frame {int(i)}") from exc
        image = cv2.imdecode(png, flag)
        if image is None:
            raise InvalidInput(f"frame {int(i)} of the frame archive is corrupt")
        image = image.reshape(shape[1:])
        out[row] = image
    return out


class FramesReader:
    """Reads an `encode_frames` archive from a file one frame at a time: the stack is never whole in memory.

    A consumer of a long video's crops (the texture stage's target) decodes frame after frame from the archive
    on disk instead of the whole stack at once; frames come out bit-exact, as `decode_frames` gives them.
    """

    def __init__(self, file: str | BinaryIO) -> None:
        try:
            self._archive = zipfile.ZipFile(file)
            header = json.loads(self._archive.read("header.json"))
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
            raise InvalidInput(f"not a frame archive: {exc}") from exc
        if header.get("format") != FRAMES_FORMAT:
            self._archive.close()
            raise InvalidInput(f"unknown frame archive format {header.get('format')!r}")
        self.shape: tuple[int, ...] = tuple(int(v) for v in header["shape"])
        """The stack's shape [F, h, w(, C)]."""

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, index: int) -> np.ndarray:
        """Frame `index`, uint8 [h, w(, C)]."""
        if not 0 <= index < self.shape[0]:
            raise InvalidInput(f"crop index {index} out of range [0, {self.shape[0]})")
        try:
            png = np.frombuffer(self._archive.read(f"{int(index):06d}.png"), dtype=np.uint8)
        except KeyError as exc:
            raise InvalidInput(f"frame archive lacks frame {int(index)}") from exc
        image = cv2.imdecode(png, cv2.IMREAD_UNCHANGED)
        if image is None:
            raise InvalidInput(f"frame {int(index)} of the frame archive is corrupt")
        return image.reshape(self.shape[1:])

    def __iter__(self):
        for index in range(self.shape[0]):
            yield self.read(index)

    def member_offset(self, index: int) -> int:
        """Byte offset in the file where frame `index`'s member starts (frames lie in order, the header last).

        Everything before frame i's offset belongs to frames before i: a consumer that reads in order may free it.
        """
        try:
            return self._archive.getinfo(f"{int(index):06d}.png").header_offset
        except KeyError as exc:
            raise InvalidInput(f"frame archive lacks frame {int(index)}") from exc

    def close(self) -> None:
        """Close the archive (and the file, when it was opened from a path)."""
        self._archive.close()

    def __enter__(self) -> FramesReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
