"""Start the TF Serving stand-in: `python -m services.tfserving` (the local stack; containers run tensorflow/serving).

Environment: A2V_LISTEN (host:port of the gRPC API; TF Serving's is 8500), A2V_TFSERVING_MODEL_CONFIG (the model
list, as --model_config_file) or A2V_MODELS_DIR (default `./models` under the working directory: every folder a
model), A2V_TFSERVING_POLL_SECONDS and the usual A2V_MAX_WORKERS, A2V_MAX_MESSAGE_BYTES (default 64 MiB here),
A2V_GRACE_SECONDS, A2V_LOG_LEVEL. It needs no object store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from services.runtime.config import Config, ConfigError, StoreConfig, TracingConfig, read_settings
from services.runtime.logs import configure_logging
from services.runtime.server import serve
from services.tfserving.servicer import SERVICE, TFServingConfig, bindings

log = logging.getLogger(__name__)

_NO_STORE = StoreConfig(endpoint="", access_key="", secret_key="")
"""`serve` takes a whole `Config` but reads only its server part; this service has no object store."""


def main(environ: Mapping[str, str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code (2: bad configuration)."""
    try:
        config = TFServingConfig.from_env(environ)
    except ConfigError as exc:
        configure_logging(SERVICE)
        log.error("%s", exc)
        return 2
    manager = config.manager()
    try:
        return serve(
            Config(server=config.server, store=_NO_STORE, tracing=read_settings(TracingConfig.read, environ)),
            bindings(manager),
        )
    finally:
        manager.close()


if __name__ == "__main__":
    raise SystemExit(main())
