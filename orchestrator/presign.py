"""Presigned URLs for callers without store credentials (OrchestratorService.PresignObject, issue 16 item 3).

Uploads: a PUT of `uploads/<caller>/<sha256><suffix>`, signed (AWS Signature V4, query string) over the host and
the headers Content-Length, Content-Type and `x-amz-meta-sha256`, so the store refuses a body of another size
(SignatureDoesNotMatch), another key, another hash recorded, and any request after the expiry. The caller is the
name its bearer token has in A2V_AUTH_TOKENS_FILE ("anonymous" without tokens): each caller writes under its own
prefix only, and with a callers file a job it submits may name only those uploads as inputs (`Callers.check_inputs`;
the `admin` scope names any key). Downloads: a GET of a job's result, or of a key inside the job's folder
`jobs/<id>/`; nothing else.

Settings: A2V_S3_PUBLIC_ENDPOINT (the store as callers reach it, `host:port` or `http(s)://host:port`; default the
orchestrator's own A2V_S3_ENDPOINT), A2V_PRESIGN_SECONDS (how long a URL works, default 900, at most 7 days, the
S3 limit), A2V_UPLOAD_MAX_BYTES (the largest upload, default 2 GiB).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit

from google.protobuf.timestamp_pb2 import Timestamp
from minio import Minio

from audio2video.common.v1 import common_pb2
from audio2video.orchestrator.v1 import orchestrator_pb2 as pb
from services.runtime.blobstore import SHA256_META, BlobStore
from services.runtime.config import ConfigError, Env, StoreConfig
from services.runtime.errors import FailedPrecondition, Forbidden, InvalidInput, TooLarge
from services.runtime.keys import content_key, validate_key
from services.runtime.protos import object_ref
from services.runtime.security import AUTHORIZATION, SCOPE_ADMIN, Caller, TokenRegistry, Unauthenticated

UPLOADS_PREFIX = "uploads"
ANONYMOUS = "anonymous"
DEFAULT_PRESIGN_SECONDS = 900
MAX_PRESIGN_SECONDS = 7 * 86400
DEFAULT_UPLOAD_MAX_BYTES = 2 * 1024**3
SHA256_HEADER = f"x-amz-meta-{SHA256_META}"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(r"^(\.[A-Za-z0-9]{1,10})?$")
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}$")
_CALLER_SEGMENT = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass(frozen=True)
class PresignSettings:
    """Where callers reach the store, how long a URL works, how large an upload may be."""

    public_endpoint: str = ""
    public_secure: bool | None = None
    seconds: int = DEFAULT_PRESIGN_SECONDS
    upload_max_bytes: int = DEFAULT_UPLOAD_MAX_BYTES

    @classmethod
    def from_env(cls, environ=None) -> PresignSettings:
        env = Env(environ)
        endpoint = env.get_str("A2V_S3_PUBLIC_ENDPOINT", "")
        seconds = env.get_int("A2V_PRESIGN_SECONDS", DEFAULT_PRESIGN_SECONDS, minimum=1, maximum=MAX_PRESIGN_SECONDS)
        limit = env.get_int("A2V_UPLOAD_MAX_BYTES", DEFAULT_UPLOAD_MAX_BYTES, minimum=1)
        env.check()
        secure = None
        if "://" in endpoint:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
                raise ConfigError(f"A2V_S3_PUBLIC_ENDPOINT {endpoint!r} is not http(s)://host[:port]")
            endpoint, secure = parts.netloc, parts.scheme == "https"
        return cls(public_endpoint=endpoint, public_secure=secure, seconds=seconds, upload_max_bytes=limit)


def presign_v4(
    method: str,
    base_url: str,
    bucket: str,
    key: str,
    *,
    access_key: str,
    secret_key: str,
    region: str,
    expires_seconds: int,
    headers: dict[str, str],
    now: datetime | None = None,
) -> str:
    """A query-string-signed S3 URL (AWS Signature V4) whose signature also covers `headers`.

    The minio SDK signs the host only; an upload needs its size and hash signed too, so that the store refuses a
    request that carries others.
    """
    now = now or datetime.now(UTC)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    parts = urlsplit(base_url)
    path = f"/{quote(bucket, safe='')}/{quote(key, safe='-_.~/')}"
    scope = f"{day}/{region}/s3/aws4_request"
    signed = {"host": parts.netloc, **{name.lower(): str(value).strip() for name, value in headers.items()}}
    signed_names = ";".join(sorted(signed))
    query = {
        "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
        "X-Amz-Credential": f"{access_key}/{scope}",
        "X-Amz-Date": stamp,
        "X-Amz-Expires": str(expires_seconds),
        "X-Amz-SignedHeaders": signed_names,
    }
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
    canonical_headers = "".join(f"{name}:{signed[name]}\n" for name in sorted(signed))
    request = f"{method}\n{path}\n{canonical_query}\n{canonical_headers}\n{signed_names}\nUNSIGNED-PAYLOAD"
    to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
    signing_key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{parts.scheme}://{parts.netloc}{path}?{canonical_query}&X-Amz-Signature={signature}"


def caller_folder(name: str) -> str:
    """A caller's name as the folder of its uploads (`uploads/<folder>/`): one safe key segment."""
    return _CALLER_SEGMENT.sub("_", name)[:64].strip(".") or ANONYMOUS


class Callers:
    """Who calls (its bearer token's or its mTLS certificate's caller, as the server's check finds it): the name of
    its uploads prefix, and whether a job's inputs are its own."""

    def __init__(self, tokens_file: str = "") -> None:
        self.registry = TokenRegistry(tokens_file) if tokens_file else None

    def caller(self, context) -> Caller | None:
        """The call's caller; None without a callers file (the open development stack, where all are anonymous)."""
        if self.registry is None or context is None:
            return None
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        try:  # as the server's check names it: the bearer token's caller, else the mTLS certificate's
            return self.registry.identify(metadata.get(AUTHORIZATION, ""), context)
        except Unauthenticated as exc:  # the server's check lets no such call through; be safe anyway
            raise Forbidden(f"no known caller: {exc}") from exc

    def name(self, context) -> str:
        """The folder of the caller's uploads (`uploads/<name>/`); "anonymous" without a callers file."""
        caller = self.caller(context)
        return ANONYMOUS if caller is None else caller_folder(caller.name)

    def owner(self, context) -> str:
        """The name a job the call submits is recorded under (its owner): the caller's; "" without a callers file."""
        caller = self.caller(context)
        return "" if caller is None else caller.name

    def jobs_of(self, context) -> str | None:
        """Whose jobs the caller may see and act on: its own (its name); every job (None) for a caller with the
        `admin` scope, and for every call without a callers file (the open development stack)."""
        caller = self.caller(context)
        return None if caller is None or caller.allows(SCOPE_ADMIN) else caller.name

    def check_inputs(self, context, inputs: Iterable[tuple[str, common_pb2.ObjectRef]], bucket: str) -> None:
        """Refuse (PERMISSION_DENIED) a job input that is not the caller's own upload.

        With a callers file, a job's inputs must lie under the caller's `uploads/<caller>/` in the orchestrator's
        `bucket` (where PresignObject puts them), so that no caller renders another's upload or a stage's internal
        blob; a caller with the `admin` scope may name any key. Without a callers file (the open development
        stack) anything stored goes, as before. An input without a key is left to the job's own checks.
        """
        caller = self.caller(context)
        if caller is None or caller.allows(SCOPE_ADMIN):
            return
        prefix = f"{UPLOADS_PREFIX}/{caller_folder(caller.name)}/"
        for what, ref in inputs:
            if not ref.key:
                continue
            validate_key(ref.key)
            if ref.bucket and ref.bucket != bucket:
                raise Forbidden(
                    f"the {what} is in bucket {ref.bucket[:64]!r}: a job's inputs are in the orchestrator's bucket"
                )
            if not ref.key.startswith(prefix):
                raise Forbidden(
                    f"the {what} {ref.key!r} is not an upload of caller {caller.name!r}: a job's inputs must be under "
                    f"{prefix} (where PresignObject puts them); only the admin scope may name other keys"
                )


class Presigner:
    """Presigned PUT URLs for inputs and GET URLs for results, on the store as callers reach it."""

    def __init__(self, store: BlobStore, config: StoreConfig, settings: PresignSettings) -> None:
        self.store = store
        self.config = config
        self.settings = settings
        endpoint = settings.public_endpoint or config.endpoint
        secure = config.secure if settings.public_secure is None else settings.public_secure
        self.base_url = f"{'https' if secure else 'http'}://{endpoint}"
        # Signing needs no request: the region is given, so the SDK never asks the (maybe unreachable) endpoint.
        self.signer = Minio(
            endpoint, access_key=config.access_key, secret_key=config.secret_key, secure=secure, region=config.region
        )

    def _expiry(self, now: datetime) -> Timestamp:
        stamp = Timestamp()
        stamp.FromDatetime(now + timedelta(seconds=self.settings.seconds))
        return stamp

    def upload(self, caller: str, target: pb.UploadTarget) -> pb.PresignObjectResponse:
        """A PUT URL of the caller's content-addressed upload key (or `exists` when it is stored already)."""
        sha = target.sha256.lower()
        if not _HEX64.match(sha):
            raise InvalidInput("sha256 must be 64 hex digits")
        if not _SUFFIX.match(target.suffix):
            raise InvalidInput(f"suffix {target.suffix!r} is not a dot and 1-10 letters or digits")
        content_type = target.content_type or "application/octet-stream"
        if not _CONTENT_TYPE.match(content_type):
            raise InvalidInput(f"content type {content_type[:80]!r} is not type/subtype")
        if target.size_bytes < 0:
            raise InvalidInput("size_bytes must not be negative")
        limit = min(self.settings.upload_max_bytes, self.store.max_object_bytes)
        if target.size_bytes > limit:
            raise TooLarge(f"an upload of {target.size_bytes} bytes is over the limit of {limit} bytes")
        key = content_key(f"{UPLOADS_PREFIX}/{caller}", sha, target.suffix.lower())
        existing = self.store.stat(key, missing_ok=True)
        if existing is not None and existing.sha256 == sha and existing.size_bytes == target.size_bytes:
            return pb.PresignObjectResponse(method="PUT", object=object_ref(existing), exists=True)
        headers = {"Content-Length": str(target.size_bytes), "Content-Type": content_type, SHA256_HEADER: sha}
        now = datetime.now(UTC)
        url = presign_v4(
            "PUT",
            self.base_url,
            self.store.bucket,
            key,
            access_key=self.config.access_key,
            secret_key=self.config.secret_key,
            region=self.config.region,
            expires_seconds=self.settings.seconds,
            headers=headers,
            now=now,
        )
        ref = common_pb2.ObjectRef(
            bucket=self.store.bucket, key=key, sha256=sha, content_type=content_type, size_bytes=target.size_bytes
        )
        return pb.PresignObjectResponse(
            url=url, method="PUT", headers=headers, object=ref, expires=self._expiry(now), exists=False
        )

    def download(self, job: pb.Job, key: str) -> pb.PresignObjectResponse:
        """A GET URL of the job's result or of a key inside its folder; PERMISSION_DENIED for anything else."""
        if not key:
            if job.state != pb.JOB_STATE_SUCCEEDED or not job.result.key:
                state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
                raise FailedPrecondition(f"job {job.id} is {state}: it has no result to download")
            key, bucket = job.result.key, job.result.bucket
        else:
            validate_key(key)
            bucket = job.result.bucket if key == job.result.key else ""
            if key != job.result.key and not key.startswith(f"jobs/{job.id}/"):
                raise Forbidden(f"{key!r} is neither job {job.id}'s result nor inside its folder jobs/{job.id}/")
        if bucket and bucket != self.store.bucket:
            raise Forbidden(f"bucket {bucket!r} is not the orchestrator's")
        ref = self.store.stat(key)  # NOT_FOUND for a missing object, before a URL that would only 404
        now = datetime.now(UTC)
        url = self.signer.get_presigned_url(
            "GET", self.store.bucket, key, expires=timedelta(seconds=self.settings.seconds), request_date=now
        )
        return pb.PresignObjectResponse(url=url, method="GET", object=object_ref(ref), expires=self._expiry(now))
