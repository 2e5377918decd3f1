"""One owner per job among orchestrator replicas: a lease object per job, taken and renewed by compare-and-swap.

`jobs/<id>/lease.json` holds {"owner", "expires"} (seconds since the epoch). A replica runs a job only while it
holds its lease: it takes a free or expired one (or its own, after a restart under the same replica id) with a
conditional write naming the version it read, renews it every third of its time, and stops the job when a renewal
finds the lease taken. The object store decides every write atomically (If-Match / If-None-Match), so two replicas
never both hold a job, with no coordinator besides the store the jobs live in already.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from services.runtime.blobstore import BlobStore

log = logging.getLogger(__name__)


def lease_key(job_id: str) -> str:
    return f"jobs/{job_id}/lease.json"


@dataclass(frozen=True)
class Holder:
    """Who holds a job's lease, and until when (seconds since the epoch)."""

    owner: str
    expires: float

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


class Leases:
    """The leases this replica (`owner`) holds, `ttl_seconds` long."""

    def __init__(self, store: BlobStore, owner: str, ttl_seconds: float = 30.0) -> None:
        self.store = store
        self.owner = owner
        self.ttl = ttl_seconds
        self.held: dict[str, str] = {}  # job id -> ETag of the lease as this replica last wrote it

    def holder(self, job_id: str) -> Holder | None:
        found = self.store.read_versioned(lease_key(job_id))
        if found is None:
            return None
        try:
            fields = json.loads(found[0])
            return Holder(str(fields["owner"]), float(fields["expires"]))
        except (ValueError, KeyError, TypeError):
            return Holder("", 0.0)  # unreadable: as good as expired

    def _write(self, job_id: str, etag: str | None, expires: float) -> str | None:
        body = json.dumps({"owner": self.owner, "expires": expires}).encode()
        return self.store.write_versioned(lease_key(job_id), body, etag=etag)

    def acquire(self, job_id: str) -> bool:
        """Take the job's lease if it is free, expired or already this replica's; True when held now."""
        found = self.store.read_versioned(lease_key(job_id))
        etag = None
        if found is not None:
            data, etag = found
            try:
                fields = json.loads(data)
                holder = Holder(str(fields["owner"]), float(fields["expires"]))
            except (ValueError, KeyError, TypeError):
                holder = Holder("", 0.0)
            if holder.owner != self.owner and not holder.expired():
                return False
            if holder.owner and holder.owner != self.owner:
                log.info("taking over job %s from %s (its lease expired)", job_id, holder.owner)
        written = self._write(job_id, etag, time.time() + self.ttl)
        if written is None:
            return False
        self.held[job_id] = written
        return True

    def renew(self, job_id: str) -> bool:
        """Extend a held lease; False when another replica took it meanwhile (the job must stop here)."""
        etag = self.held.get(job_id)
        if etag is None:
            return False
        written = self._write(job_id, etag, time.time() + self.ttl)
        if written is None:
            self.held.pop(job_id, None)
            log.warning("lost the lease of job %s to another replica", job_id)
            return False
        self.held[job_id] = written
        return True

    def release(self, job_id: str) -> None:
        """Give the lease up (the job ended here): it expires at once, so nobody waits for it."""
        etag = self.held.pop(job_id, None)
        if etag is not None:
            self._write(job_id, etag, 0.0)
