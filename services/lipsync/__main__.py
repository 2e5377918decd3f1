"""Start the `lipsync` service: `python -m services.lipsync` (same entry point in containers and locally)."""

from services.lipsync.servicer import LipsyncSettings, bindings
from services.runtime.server import run_service

if __name__ == "__main__":
    run_service("lipsync", bindings, LipsyncSettings.read)
