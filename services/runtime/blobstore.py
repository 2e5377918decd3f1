"""Blob store over the `minio` SDK: bytes, files and numpy arrays, each verified by sha256 on read."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.error import MinioException, S3Error
from minio.helpers import genheaders, md5sum_hash
from minio.xml import Element, SubElement, getbytes

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
from services.runtime.keys import (
    ZIP_EPOCH,
    canonical_json,
    content_key,
    is_derived_key,
    is_sha256,
    sha256_bytes,
    sha256_file,
    validate_key,
)
from services.runtime.telemetry import record_store_bytes

log = logging.getLogger(__name__)

SHA256_META = "sha256"
ARRAY_META = "a2v-array"
ARRAY_FORMAT_VERSION = 1
NPY_CONTENT_TYPE = "application/x-npy"
NPZ_CONTENT_TYPE = "application/x-npz"
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NoSuchUpload", "ResourceNotFound"}
_AUTH_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken"}
_EXISTS_CODES = {"PreconditionFailed"}  # a conditional write (If-None-Match: *) found the key taken
_CONFLICT_CODES = {"ConditionalRequestConflict"}  # another conditional write of the key is in flight
REREAD_DELAY_SECONDS = 0.5


@dataclass(frozen=True)
class BlobRef:
    """Where a blob is and what it holds (mirrors common.v1.ObjectRef)."""

    bucket: str
    key: str
    sha256: str = ""
    content_type: str = ""
    size_bytes: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ArrayInfo:
    """Shape and time base of an array blob (mirrors common.v1.ArrayMeta)."""

    shape: tuple[int, ...]
    dtype: str
    fps: float = 0.0
    start_seconds: float = 0.0
    format_version: int = ARRAY_FORMAT_VERSION


class BlobStore:
    """Typed access to one default bucket of an S3-compatible server.

    Every write records the content's sha256 as user metadata and every read checks it, so a
    corrupted or truncated object is reported (DATA_LOSS) instead of being processed. Objects are
    written with a single PUT (or a multipart upload that the server completes atomically), so a
    failed write never leaves a half-written object under the final key.

    Stage outputs under derived keys (`keys.derive_key`: the key names the inputs and parameters) are
    written once: the PUT is conditional (`If-None-Match: *`), the first complete write wins and a later
    writer of the same key gets the stored object's reference back instead of replacing it. Two jobs doing
    the same work at once then agree on every object, even where encoders do not give byte-equal output.
    Other keys (job manifests, outputs a caller named) are overwritten as before; `if_absent=` chooses
    explicitly.
    """

    def __init__(
        self,
        client: Minio,
        bucket: str,
        *,
        part_size_bytes: int = 16 * 1024 * 1024,
        max_object_bytes: int = 8 * 1024 * 1024 * 1024,
        endpoint: str = "",
        allowed_buckets: Sequence[str] = (),
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.part_size_bytes = part_size_bytes
        self.max_object_bytes = max_object_bytes
        self.endpoint = endpoint
        # A request naming any other bucket is refused (issue 16: a stage reads and writes its own bucket only).
        self.allowed_buckets = frozenset([bucket, *allowed_buckets])

    @classmethod
    def from_config(cls, config: StoreConfig) -> BlobStore:
        """A store over the S3 endpoint and bucket of `config`."""
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=120.0),
            maxsize=16,
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        client = Minio(
            config.endpoint,
            access_key=config.access_key,
            secret_key=config.secret_key,
            secure=config.secure,
            region=config.region,
            http_client=http,
        )
        return cls(
            client,
            config.bucket,
            part_size_bytes=config.part_size_bytes,
            max_object_bytes=config.max_object_bytes,
            endpoint=config.endpoint,
            allowed_buckets=config.allowed_buckets,
        )

    # -- buckets -------------------------------------------------------------------------------

    def ensure_bucket(self, bucket: str | None = None) -> None:
        """Create the bucket unless it exists (idempotent, safe against concurrent creators)."""
        bucket = self._bucket(bucket)
        with self._translate(bucket, ""):
            if self.client.bucket_exists(bucket):
                return
            try:
                self.client.make_bucket(bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    # -- writes --------------------------------------------------------------------------------

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
        bucket: str | None = None,
        if_absent: bool | None = None,
    ) -> BlobRef:
        """Store `data` at `key`.

        With `if_absent` (default: for derived keys) an existing object is kept and its reference returned.
        """
        bucket = self._bucket(bucket)
        validate_key(key)
        self._check_size(len(data), bucket, key)
        sha = sha256_bytes(data)
        user = self._user_metadata(sha, metadata)
        if self._write_once(key, if_absent):
            existing = self._put_once(bucket, key, io.BytesIO(data), len(data), content_type, user)
            if existing is not None:
                return existing
        else:
            with self._translate(bucket, key):
                self.client.put_object(
                    bucket,
                    key,
                    io.BytesIO(data),
                    len(data),
                    content_type=content_type,
                    metadata=user,
                    part_size=self.part_size_bytes,
                )
        record_store_bytes("written", len(data))
        return BlobRef(bucket, key, sha, content_type, len(data), dict(metadata or {}))

    def put_file(
        self,
        key: str,
        path: str | Path,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
        bucket: str | None = None,
        if_absent: bool | None = None,
    ) -> BlobRef:
        """Upload a local file; large files go up in `part_size_bytes` parts (multipart).

        `if_absent` as in `put_bytes`.
        """
        bucket = self._bucket(bucket)
        validate_key(key)
        size = os.path.getsize(path)
        self._check_size(size, bucket, key)
        sha = sha256_file(path)
        user = self._user_metadata(sha, metadata)
        if self._write_once(key, if_absent):
            with open(path, "rb") as handle:
                existing = self._put_once(bucket, key, handle, size, content_type, user)
            if existing is not None:
                return existing
        else:
            with self._translate(bucket, key):
                self.client.fput_object(
                    bucket, key, str(path), content_type=content_type, metadata=user, part_size=self.part_size_bytes
                )
        record_store_bytes("written", size)
        return BlobRef(bucket, key, sha, content_type, size, dict(metadata or {}))

    def put_content_addressed(
        self,
        prefix: str,
        data: bytes,
        *,
        suffix: str = "",
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> BlobRef:
        """Store `data` under a key made of its own sha256; an identical existing blob is reused."""
        key = content_key(prefix, sha256_bytes(data), suffix)
        existing = self.stat(key, missing_ok=True)
        if existing is not None and existing.sha256 == sha256_bytes(data):
            return existing
        return self.put_bytes(key, data, content_type=content_type, metadata=metadata)

    def put_file_content_addressed(
        self,
        prefix: str,
        path: str | Path,
        *,
        suffix: str = "",
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> BlobRef:
        """`put_content_addressed` for a local file, streamed: hashed and uploaded in chunks, never read whole."""
        sha = sha256_file(path)
        key = content_key(prefix, sha, suffix)
        existing = self.stat(key, missing_ok=True)
        if existing is not None and existing.sha256 == sha:
            return existing
        ref = self.put_file(key, path, content_type=content_type, metadata=metadata)
        if ref.sha256 != sha:
            raise IntegrityError(f"{path} changed while it was uploaded to {key}")
        return ref

    def put_array(
        self,
        key: str,
        array: np.ndarray,
        *,
        fps: float = 0.0,
        start_seconds: float = 0.0,
        metadata: Mapping[str, str] | None = None,
        bucket: str | None = None,
        if_absent: bool | None = None,
    ) -> tuple[BlobRef, ArrayInfo]:
        """Store an array as .npy (no pickles) with its shape, dtype and time base as metadata."""
        array = np.asarray(array)
        if array.dtype == object:
            raise InvalidInput("object arrays cannot be stored (no pickles in the store)")
        info = ArrayInfo(tuple(int(n) for n in array.shape), str(array.dtype), float(fps), float(start_seconds))
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        meta = dict(metadata or {})
        meta[ARRAY_META] = json.dumps(dataclasses.asdict(info))
        ref = self.put_bytes(
            key, buffer.getvalue(), content_type=NPY_CONTENT_TYPE, metadata=meta, bucket=bucket, if_absent=if_absent
        )
        return ref, info

    def put_arrays(
        self,
        key: str,
        arrays: Mapping[str, np.ndarray],
        *,
        metadata: Mapping[str, str] | None = None,
        bucket: str | None = None,
        if_absent: bool | None = None,
    ) -> BlobRef:
        """Store several named arrays in one compressed .npz (the same arrays always give the same bytes)."""
        return self.put_bytes(
            key,
            npz_bytes(arrays),
            content_type=NPZ_CONTENT_TYPE,
            metadata=metadata,
            bucket=bucket,
            if_absent=if_absent,
        )

    # -- compare-and-swap (leases, reservations) --------------------------------------------------

    def read_versioned(self, key: str, *, bucket: str | None = None) -> tuple[bytes, str] | None:
        """A small object and its ETag (the version a `write_versioned` must name), or None when absent."""
        bucket = self._bucket(bucket)
        validate_key(key)
        try:
            with self._translate(bucket, key):
                response = self.client.get_object(bucket, key)
                try:
                    data = response.read()
                    record_store_bytes("read", len(data))
                    return data, response.headers.get("ETag", "").strip('"')
                finally:
                    response.close()
                    response.release_conn()
        except NotFound:
            return None

    def write_versioned(
        self,
        key: str,
        data: bytes,
        *,
        etag: str | None,
        content_type: str = "application/json",
        bucket: str | None = None,
    ) -> str | None:
        """Write `key` only if it is still the version `etag` names (compare-and-swap).

        With `etag` it is If-Match; with `etag=None`, only if it does not exist (If-None-Match: *). Returns the
        new ETag, or None when another writer got there first: the store decides atomically, so of two writers
        naming the same version exactly one wins.
        """
        bucket = self._bucket(bucket)
        validate_key(key)
        headers = genheaders({SHA256_META: sha256_bytes(data)}, None, None, None, False)
        headers["Content-Type"] = content_type
        headers["If-Match" if etag else "If-None-Match"] = f'"{etag}"' if etag else "*"
        try:
            with self._translate(bucket, key, passthrough=_EXISTS_CODES | _CONFLICT_CODES | _MISSING_CODES):
                result = self.client._put_object(bucket, key, data, headers)
        except S3Error as exc:
            if exc.code in _EXISTS_CODES | _CONFLICT_CODES or (etag and exc.code == "NoSuchKey"):
                return None
            raise NotFound(f"bucket not found: {bucket} ({exc.code})") from exc
        record_store_bytes("written", len(data))
        return (result.etag or "").strip('"')

    # -- reads ---------------------------------------------------------------------------------

    def stat(self, key: str, *, bucket: str | None = None, missing_ok: bool = False) -> BlobRef | None:
        """An object's reference (size, hash, type) without reading it; None when missing and `missing_ok`."""
        bucket = self._bucket(bucket)
        validate_key(key)
        try:
            with self._translate(bucket, key):
                info = self.client.stat_object(bucket, key)
        except NotFound:
            if missing_ok:
                return None
            raise
        user = _user_metadata_of(info.metadata)
        return BlobRef(bucket, key, user.pop(SHA256_META, ""), info.content_type or "", int(info.size or 0), user)

    def content_sha256(self, ref: BlobRef) -> str:
        """A sha256 digest (hex) that identifies the content `ref` names, for the inputs of derived keys.

        In order of preference:

        1. The reference's own `sha256`, without asking the store: the caller names that content, and every read
           checks the object against it (DATA_LOSS if the object has changed since), so a result keyed by it is
           the one for that content.
        2. The hash this project's writers record with every object (one stat): the true content hash, equal for
           equal content under any key.
        3. For an object another tool wrote without that metadata: the hash of what the same stat says of this
           version of the object: bucket, key, ETag, size, last-modified time and version id. A rewrite gives a
           new last-modified time and (with new content) a new ETag (on S3, MinIO and SeaweedFS the MD5 of a
           single-part body), so it never names an earlier version's results; the cost is a miss, never a stale
           hit, when equal bytes are rewritten or stored under another key.

        The object is not read and hashed in case 3: stage inputs are videos and frame archives of up to
        gigabytes, and a derived key is computed on every call, also those that a stored result then answers,
        which exist to avoid reading the inputs at all. One stat per input without a hash is the whole cost.

        Raises:
            NotFound: the object does not exist.
            InvalidInput: `ref.sha256` is set but is not a hex sha256 digest, or the key is unsafe.
            Forbidden: the bucket is not one this service uses.
        """
        bucket = self._bucket(ref.bucket or None)
        validate_key(ref.key)
        if ref.sha256:
            if not is_sha256(ref.sha256):
                raise InvalidInput(f"sha256 {ref.sha256!r} of {bucket}/{ref.key} is not a lower-case hex digest")
            return ref.sha256
        with self._translate(bucket, ref.key):
            info = self.client.stat_object(bucket, ref.key)
        recorded = _user_metadata_of(info.metadata).get(SHA256_META, "")
        if is_sha256(recorded):
            return recorded
        version = {
            "bucket": bucket,
            "key": ref.key,
            "etag": (info.etag or "").strip('"'),
            "size": int(info.size or 0),
            "modified": info.last_modified.isoformat() if info.last_modified else "",
            "version": info.version_id or "",
        }
        return sha256_bytes(canonical_json({"unhashed object": version}).encode())

    def exists(self, key: str, *, bucket: str | None = None) -> bool:
        """Whether an object is stored at `key`."""
        return self.stat(key, bucket=bucket, missing_ok=True) is not None

    def get_bytes(
        self, key: str, *, bucket: str | None = None, expected_sha256: str = "", max_bytes: int | None = None
    ) -> bytes:
        """Read a whole object, refusing ones over `max_bytes` and checking its sha256."""
        bucket = self._bucket(bucket)
        validate_key(key)
        limit = self.max_object_bytes if max_bytes is None else max_bytes
        for reread in (False, True):
            with self._translate(bucket, key):
                response = self.client.get_object(bucket, key)
                try:
                    size = int(response.headers.get("Content-Length", "0"))
                    if size > limit:
                        raise TooLarge(f"object {bucket}/{key} is {size} bytes, over the limit of {limit}")
                    recorded = _user_metadata_of(response.headers).get(SHA256_META, "")
                    data = response.read()
                finally:
                    response.close()
                    response.release_conn()
            record_store_bytes("read", len(data))
            actual = sha256_bytes(data)
            if reread or not self._rewritten(bucket, key, actual, recorded, expected_sha256):
                break
        self._verify(bucket, key, actual, recorded, expected_sha256)
        return data

    def get_file(self, key: str, path: str | Path, *, bucket: str | None = None, expected_sha256: str = "") -> BlobRef:
        """Download to `path` atomically: the file appears only once its content has been verified."""
        bucket = self._bucket(bucket)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(handle)
        try:
            for reread in (False, True):
                ref = self.stat(key, bucket=bucket)
                with self._translate(bucket, key):
                    self.client.fget_object(bucket, key, temp_name)
                record_store_bytes("read", os.path.getsize(temp_name))
                actual = sha256_file(temp_name)
                if reread or not self._rewritten(bucket, key, actual, ref.sha256, expected_sha256):
                    break
            self._verify(bucket, key, actual, ref.sha256, expected_sha256)
            os.replace(temp_name, path)
        finally:
            if os.path.exists(temp_name):
                os.unlink(temp_name)
        return ref

    def get_array(
        self, key: str, *, bucket: str | None = None, expected_sha256: str = "", max_bytes: int | None = None
    ) -> tuple[np.ndarray, ArrayInfo]:
        """An array stored by `put_array` and its facts, read with the checks of `get_bytes`."""
        data = self.get_bytes(key, bucket=bucket, expected_sha256=expected_sha256, max_bytes=max_bytes)
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty object
            raise InvalidInput(f"object {key!r} is not a .npy array: {exc}") from exc
        if not isinstance(array, np.ndarray):  # an .npz archive loads too, as an NpzFile
            array.close()
            raise InvalidInput(f"object {key!r} is not a .npy array (it is an .npz archive)")
        meta = self.stat(key, bucket=bucket).metadata.get(ARRAY_META)
        fields = json.loads(meta) if meta else {}
        info = ArrayInfo(
            tuple(array.shape),
            str(array.dtype),
            float(fields.get("fps", 0.0)),
            float(fields.get("start_seconds", 0.0)),
            int(fields.get("format_version", ARRAY_FORMAT_VERSION)),
        )
        return array, info

    def get_arrays(
        self, key: str, *, bucket: str | None = None, expected_sha256: str = "", max_bytes: int | None = None
    ) -> dict[str, np.ndarray]:
        """The named arrays of an .npz archive, read with the checks of `get_bytes`."""
        data = self.get_bytes(key, bucket=bucket, expected_sha256=expected_sha256, max_bytes=max_bytes)
        try:
            archive = np.load(io.BytesIO(data), allow_pickle=False)
            if isinstance(archive, np.ndarray):  # a .npy array loads too
                raise ValueError("it is a .npy array")
            with archive:
                return {name: archive[name] for name in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise InvalidInput(f"object {key!r} is not a .npz archive: {exc}") from exc

    def delete(self, key: str, *, bucket: str | None = None) -> None:
        """Remove the object at `key`."""
        bucket = self._bucket(bucket)
        with self._translate(bucket, validate_key(key)):
            self.client.remove_object(bucket, key)

    def list_keys(self, prefix: str, *, bucket: str | None = None) -> Iterator[str]:
        """The keys under `prefix`, recursively."""
        bucket = self._bucket(bucket)
        with self._translate(bucket, prefix):
            for item in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                yield item.object_name

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _write_once(key: str, if_absent: bool | None) -> bool:
        return is_derived_key(key) if if_absent is None else if_absent

    def _put_once(
        self, bucket: str, key: str, data: BinaryIO, size: int, content_type: str, user: Mapping[str, str]
    ) -> BlobRef | None:
        """PUT `size` bytes of `data` only if `key` is free (If-None-Match: *).

        Returns None once written, else the reference of the object already there (the first writer's).
        The minio SDK has no conditional writes, so this uses its request layer (`_put_object`,
        `_create_multipart_upload`, `_upload_part`, `_execute`) with the SDK's own signing, as its
        `put_object` does; objects over one part go up as a multipart upload whose completion is conditional.
        """
        headers = genheaders(dict(user), None, None, None, False)
        headers["Content-Type"] = content_type or "application/octet-stream"
        for attempt in range(1, 6):
            data.seek(0)
            try:
                with self._translate(bucket, key, passthrough=_EXISTS_CODES | _CONFLICT_CODES):
                    if size <= self.part_size_bytes:
                        self.client._put_object(bucket, key, data.read(size), {**headers, "If-None-Match": "*"})
                    else:
                        self._multipart_once(bucket, key, data, size, headers)
                return None
            except S3Error as exc:
                existing = self.stat(key, bucket=bucket, missing_ok=True)
                if existing is not None:
                    log.debug("%s/%s was written by another writer first: reusing it (%s)", bucket, key, exc.code)
                    return existing
                if exc.code not in _CONFLICT_CODES or attempt == 5:
                    raise Unavailable(f"conditional write of {bucket}/{key} failed: {exc.code}") from exc
                time.sleep(0.1 * attempt)  # the other writer's upload is completing
        raise AssertionError("unreachable")

    def _multipart_once(self, bucket: str, key: str, data: BinaryIO, size: int, headers: dict) -> None:
        upload_id = self.client._create_multipart_upload(bucket, key, dict(headers))
        try:
            parts = []
            for number, offset in enumerate(range(0, size, self.part_size_bytes), start=1):
                chunk = data.read(min(self.part_size_bytes, size - offset))
                parts.append(Part(number, self.client._upload_part(bucket, key, chunk, None, upload_id, number)))
            element = Element("CompleteMultipartUpload")
            for part in parts:
                tag = SubElement(element, "Part")
                SubElement(tag, "PartNumber", str(part.part_number))
                SubElement(tag, "ETag", '"' + part.etag + '"')
            body = getbytes(element)
            complete = {"Content-Type": "application/xml", "Content-MD5": md5sum_hash(body), "If-None-Match": "*"}
            self.client._execute("POST", bucket, key, body=body, headers=complete, query_params={"uploadId": upload_id})
        except BaseException:
            try:
                self.client._abort_multipart_upload(bucket, key, upload_id)
            except (S3Error, MinioException, urllib3.exceptions.HTTPError):
                log.warning("could not abort the multipart upload of %s/%s", bucket, key)
            raise

    @staticmethod
    def _rewritten(bucket: str, key: str, actual: str, recorded: str, expected: str) -> bool:
        """Whether an intact object differs from the version the reader expected.

        Another writer replaced it between the reader learning its hash and reading it: worth one more read,
        after a moment.
        """
        if expected and actual == recorded and actual != expected:
            log.warning("%s/%s changed since its hash was recorded; reading it again", bucket, key)
            time.sleep(REREAD_DELAY_SECONDS)
            return True
        return False

    def _bucket(self, bucket: str | None) -> str:
        """`bucket`, or this store's own when empty; Forbidden unless it is one this service may use."""
        bucket = bucket or self.bucket
        if bucket not in self.allowed_buckets:
            allowed = ", ".join(sorted(self.allowed_buckets))
            raise Forbidden(f"bucket {bucket!r} is not one this service uses ({allowed}; A2V_S3_ALLOWED_BUCKETS)")
        return bucket

    def _check_size(self, size: int, bucket: str, key: str) -> None:
        if size > self.max_object_bytes:
            raise TooLarge(f"object {bucket}/{key} would be {size} bytes, over the limit of {self.max_object_bytes}")

    @staticmethod
    def _user_metadata(sha: str, metadata: Mapping[str, str] | None) -> dict[str, str]:
        user = {str(k): str(v) for k, v in (metadata or {}).items()}
        for name, value in user.items():
            if not value.isascii() or not name.isascii():
                raise InvalidInput(f"metadata {name!r} must be ASCII (it travels as an HTTP header)")
        user[SHA256_META] = sha
        return user

    @staticmethod
    def _verify(bucket: str, key: str, actual: str, recorded: str, expected: str) -> None:
        for source, wanted in (("recorded", recorded), ("expected", expected)):
            if wanted and wanted != actual:
                raise IntegrityError(
                    f"object {bucket}/{key} is corrupt: content sha256 {actual[:16]}... "
                    f"differs from the {source} {wanted[:16]}..."
                )

    @contextmanager
    def _translate(
        self, bucket: str, key: str, *, passthrough: set[str] | frozenset[str] = frozenset()
    ) -> Iterator[None]:
        """Turn SDK and network errors into the runtime's error types, naming the object.

        S3 errors whose code is in `passthrough` stay as they are.
        """
        where = f"{bucket}/{key}" if key else bucket
        try:
            yield
        except S3Error as exc:
            if exc.code in passthrough:
                raise
            if exc.code in _MISSING_CODES:
                what = "bucket" if exc.code == "NoSuchBucket" else "object"
                raise NotFound(f"{what} not found: {where if what == 'object' else bucket}") from exc
            if exc.code in _AUTH_CODES:
                raise FailedPrecondition(f"object store refused the credentials for {where} ({exc.code})") from exc
            if exc.code in ("InvalidBucketName", "InvalidObjectName", "KeyTooLongError"):
                raise InvalidInput(f"invalid object name {where}: {exc.code}") from exc
            raise Unavailable(f"object store error on {where}: {exc.code} {exc.message}") from exc
        except ValueError as exc:
            # The SDK validates bucket names client-side with ValueError.
            if "bucket name" in str(exc):
                raise InvalidInput(f"invalid bucket name {bucket!r}") from exc
            raise
        except (urllib3.exceptions.HTTPError, MinioException, ConnectionError, TimeoutError) as exc:
            raise Unavailable(
                f"object store at {self.endpoint or 'its endpoint'} unreachable while accessing "
                f"{where}: {type(exc).__name__}"
            ) from exc


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A compressed .npz of `arrays` (what `np.savez_compressed` writes) with fixed member dates.

    Equal arrays give equal bytes; `np.load` reads it.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(array), allow_pickle=False)
    return buffer.getvalue()


def _user_metadata_of(headers: Mapping[str, str]) -> dict[str, str]:
    """User metadata from response headers, whatever the server's header capitalisation."""
    prefix = "x-amz-meta-"
    return {name[len(prefix) :].lower(): value for name, value in headers.items() if name.lower().startswith(prefix)}


def wait_for_store(store: BlobStore, *, timeout_seconds: float = 30.0, poll_seconds: float = 0.5) -> None:
    """Create the default bucket, retrying while the object store is still starting."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            store.ensure_bucket()
            return
        except Unavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(poll_seconds)
