"""Structured (one JSON object per line) logging to stdout, configured once per process."""

from __future__ import annotations

import json
import logging
import sys
import time

from services.runtime.telemetry import CorrelationFilter

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats records as JSON with the service name and any `extra={...}` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line: time, level, logger, message, and the exception when there is one."""
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every logger's records to stdout as JSON lines, tagged with `service` and the running call's ids."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(CorrelationFilter())  # job_id, request_id and trace_id of the call being handled
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The S3 client logs every retry at WARNING through urllib3; keep its noise down.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
