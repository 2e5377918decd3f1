"""Container health check: `python -m deploy.healthcheck SERVICE` exits 0 while SERVICE reports SERVING.

The images' HEALTHCHECK and docker compose run it inside the container (Kubernetes uses its native
gRPC probes instead). The address defaults to loopback on the port of `A2V_LISTEN`, where the service
itself listens; "" as SERVICE asks about the server as a whole (SERVING from the start), a service's
full name asks whether it has loaded what it needs. With TLS on (A2V_TLS) it asks over TLS with the service's own
files (its CA; its certificate as the client's for mTLS; A2V_TLS_SERVER_NAME when the certificate does not name
127.0.0.1), so it can serve as an exec probe where the kubelet's gRPC probes (plaintext only) cannot.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from services.runtime.clients import health_status
from services.runtime.config import ConfigError, parse_address
from services.runtime.security import ClientSecurity


def default_address(environ: Mapping[str, str] | None = None) -> str:
    """Loopback and the port of A2V_LISTEN (raises ConfigError when it is unset or malformed)."""
    env = os.environ if environ is None else environ
    _, port = parse_address(env.get("A2V_LISTEN", ""))
    return f"127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("service", nargs="?", default="", help='full gRPC service name ("" = the whole server)')
    parser.add_argument("--address", help="host:port to ask (default: 127.0.0.1 and the port of A2V_LISTEN)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        address = args.address or default_address()
        security = ClientSecurity.from_env()
    except ConfigError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1  # Docker reserves exit code 2; anything but 0 and 1 is undefined for HEALTHCHECK
    with ClientSecurity(security.tls).channel(address, []) as channel:  # health needs no token
        status = health_status(channel, args.service, timeout_seconds=args.timeout)
    print(f"{args.service or 'server'} at {address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
