"""Start the `composite` service: `python -m services.composite` (same entry point in containers and locally)."""

from services.composite.servicer import bindings
from services.runtime.server import run_service

if __name__ == "__main__":
    run_service("composite", bindings)
