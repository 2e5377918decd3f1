"""Start the `texture` service: `python -m services.texture` (same entry point in containers and locally)."""

from services.runtime.server import run_service
from services.texture.servicer import TextureSettings, bindings

if __name__ == "__main__":
    run_service("texture", bindings, TextureSettings.read)
