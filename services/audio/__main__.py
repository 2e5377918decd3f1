"""Start the `audio` service: `python -m services.audio` (same entry point in containers and locally)."""

from services.audio.servicer import bindings, read_settings
from services.runtime.server import run_service

if __name__ == "__main__":
    run_service("audio", bindings, read_settings)
