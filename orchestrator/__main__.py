"""Start the orchestrator: `python -m orchestrator`."""

from orchestrator.servicer import bindings
from services.runtime.server import run_service

if __name__ == "__main__":
    run_service("orchestrator", bindings)
