"""Start the `teeth` service: `python -m services.teeth` (same entry point in containers and locally)."""

from services.runtime.server import run_service
from services.teeth.servicer import bindings

if __name__ == "__main__":
    run_service("teeth", bindings)
