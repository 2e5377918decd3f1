"""Single stage calls, as another system would make them (`a2v stage NAME METHOD --request JSON`).

The request is the method's message in proto3 JSON; `{"key": "@PATH"}` uploads a local file first (`upload`).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from google.protobuf import json_format

from audio2video.common.v1 import common_pb2
from client.environment import stack_environment
from client.jobs import (
    DEFAULT_UPLOAD_MAX_BYTES,
    CommandError,
    Connection,
    PresignedStore,
    presigned,
    upload,
    upload_limit,
)
from services.runtime.blobstore import BlobStore
from services.runtime.clients import create_channel
from services.runtime.config import Config, ConfigError, service_address
from services.runtime.security import ClientSecurity

STAGE_SERVICES = {
    "audio": "AudioService",
    "face": "FaceService",
    "lipsync": "LipsyncService",
    "retiming": "RetimingService",
    "texture": "TextureService",
    "teeth": "TeethService",
    "composite": "CompositeService",
}
"""Stages another system may call on its own: `a2v stage NAME METHOD --request JSON`."""


def stage_method(stage: str, method: str):
    """(stub class, method descriptor) of `<Stage>Service.<method>`; CommandError names what exists."""
    if stage not in STAGE_SERVICES:
        raise CommandError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_SERVICES)}", status=2)
    service = STAGE_SERVICES[stage]
    messages = importlib.import_module(f"audio2video.{stage}.v1.{stage}_pb2")
    stubs = importlib.import_module(f"audio2video.{stage}.v1.{stage}_pb2_grpc")
    descriptor = messages.DESCRIPTOR.services_by_name[service]
    methods = {m.name: m for m in descriptor.methods}
    if method not in methods:
        raise CommandError(f"{service} has no method {method!r}; methods: {', '.join(methods)}", status=2)
    return getattr(stubs, f"{service}Stub"), methods[method]


def describe_stages() -> str:
    """Every stage and its methods, one line each (`a2v stage` without a method)."""
    lines = []
    for stage in STAGE_SERVICES:
        messages = importlib.import_module(f"audio2video.{stage}.v1.{stage}_pb2")
        service = messages.DESCRIPTOR.services_by_name[STAGE_SERVICES[stage]]
        names = ", ".join(m.name for m in service.methods)
        lines.append(f"  {stage:<10} {names}")
    return "\n".join(lines)


def upload_references(value, store: BlobStore | PresignedStore, *, max_bytes: int = DEFAULT_UPLOAD_MAX_BYTES):
    """Replace every {"key": "@PATH"} in a request's JSON by the uploaded file's key and bucket.

    Each PATH must be a regular file of at most `max_bytes` (A2V_UPLOAD_MAX_BYTES); it is streamed, not read whole.
    Without store credentials it goes up through a URL the orchestrator signs (`PresignedStore`).
    """
    if isinstance(value, dict):
        key = value.get("key")
        if isinstance(key, str) and key.startswith("@"):
            ref = upload(store, Path(key[1:]).expanduser(), max_bytes=max_bytes)
            return {**value, "key": ref.key, "bucket": ref.bucket}
        return {name: upload_references(item, store, max_bytes=max_bytes) for name, item in value.items()}
    if isinstance(value, list):
        return [upload_references(item, store, max_bytes=max_bytes) for item in value]
    return value


def call_stage(
    stage: str,
    method: str,
    request_json: str,
    *,
    environ: Mapping[str, str] | None = None,
    timeout_seconds: float = 3600.0,
    on_progress: Callable[[common_pb2.Progress], None] | None = None,
) -> dict:
    """Call one stage method with a proto3-JSON request (local files as {"key": "@PATH"}); its result as JSON."""
    stub_class, descriptor = stage_method(stage, method)
    environ = dict(stack_environment() if environ is None else environ)
    try:
        request_value = json.loads(request_json or "{}")
    except json.JSONDecodeError as exc:
        raise CommandError(f"the request is not JSON: {exc}", status=2) from exc
    if any(isinstance(v, str) and v.startswith("@") for v in _strings(request_value)):
        try:
            max_bytes = upload_limit(environ)
            if presigned(environ):
                store = Connection(environ).uploads
            else:
                store = BlobStore.from_config(Config.from_env("a2v", environ).store)
        except ConfigError as exc:
            raise CommandError(str(exc), status=2) from exc
        request_value = upload_references(request_value, store, max_bytes=max_bytes)
    request_class = _message_class(descriptor.input_type)
    try:
        request = json_format.ParseDict(request_value, request_class())
    except json_format.ParseError as exc:
        raise CommandError(f"the request does not fit {descriptor.input_type.full_name}: {exc}", status=2) from exc
    try:
        address = service_address(stage, environ)
    except ConfigError as exc:
        raise CommandError(str(exc), status=2) from exc
    service_name = descriptor.containing_service.full_name
    try:
        security = ClientSecurity.from_env(environ)
    except ConfigError as exc:
        raise CommandError(str(exc), status=2) from exc
    stub = stub_class(create_channel(address, [service_name], timeout_seconds=timeout_seconds, security=security))
    call = getattr(stub, method)
    if descriptor.server_streaming:
        result = None
        for event in call(request):
            if event.HasField("progress"):
                if on_progress:
                    on_progress(event.progress)
            else:
                result = event.result
        if result is None:
            raise CommandError(f"{service_name}.{method} ended without a result")
    else:
        result = call(request)
    return json_format.MessageToDict(result)


def _strings(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def _message_class(descriptor):
    module = importlib.import_module(descriptor.file.name.removesuffix(".proto").replace("/", ".") + "_pb2")
    return getattr(module, descriptor.name)
