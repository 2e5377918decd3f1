"""Start the `face` service: `python -m services.face` (same entry point in containers and locally)."""

from services.face.servicer import bindings, read_settings
from services.runtime.server import run_service

if __name__ == "__main__":
    run_service("face", bindings, read_settings)
