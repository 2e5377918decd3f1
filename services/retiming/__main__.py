"""Start the `retiming` service: `python -m services.retiming` (same entry point in containers and locally)."""

from services.retiming.servicer import bindings
from services.runtime.server import run_service

if __name__ == "__main__":
    run_service("retiming", bindings)
