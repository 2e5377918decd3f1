"""The trained speakers as callers see them (OrchestratorService.ListSpeakers, `a2v speakers`).

The orchestrator lists the speakers with a complete model version in its store and asks the lipsync stage to
describe each (its versions and whether TF Serving serves them), so that a caller needs neither store credentials
nor a stage's address.
"""

from __future__ import annotations

import grpc

from audio2video.lipsync.v1 import lipsync_pb2, lipsync_pb2_grpc
from services.runtime.blobstore import BlobStore
from services.runtime.clients import rpc_failure
from services.runtime.keys import trained_speakers

DEFAULT_DESCRIBE_SECONDS = 30.0
"""Deadline of each DescribeModel call (the stage asks TF Serving; it never takes long)."""


class Speakers:
    """The stored speakers, each described by the lipsync stage."""

    def __init__(
        self,
        store: BlobStore,
        lipsync: lipsync_pb2_grpc.LipsyncServiceStub,
        *,
        timeout_seconds: float = DEFAULT_DESCRIBE_SECONDS,
    ) -> None:
        self.store = store
        self.lipsync = lipsync
        self.timeout_seconds = timeout_seconds

    def list(self, request_id: str = "") -> list[lipsync_pb2.DescribeModelResponse]:
        """Every speaker with a stored model, by name, as the lipsync stage describes it.

        A speaker whose versions went between the listing and its description (NOT_FOUND) is left out; any other
        failure of the stage ends the call (mapped by `grpc_errors`: the stage's verdict on the input, else
        UNAVAILABLE).
        """
        described = []
        for speaker in trained_speakers(self.store.list_keys("models/")):
            request = lipsync_pb2.DescribeModelRequest(speaker=speaker, request_id=request_id)
            try:
                described.append(self.lipsync.DescribeModel(request, timeout=self.timeout_seconds))
            except grpc.RpcError as exc:
                if rpc_failure(exc)[0] != grpc.StatusCode.NOT_FOUND:
                    raise
        return described
