"""A local stack of one's own: free loopback ports and the environment that puts a stack on them."""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Mapping
from pathlib import Path

from deploy.local import EXTRA_REPLICA_PORT_STEP, STACK_COMPONENTS, WEED_PORT_COUNT, stack_environment

# Ports are drawn below Linux's ephemeral range (32768-60999), from which the OS picks the local ports of
# outgoing connections: a port the OS handed out (bind to 0) could be taken by some client's connection between
# the pick and the server's bind, and a stack then failed to start ("not SERVING", address in use). A port is
# handed out once per process, so two picks never collide either.
PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()
_lock = threading.Lock()
_draw = random.Random()


def free_port() -> int:
    """A loopback TCP port nobody listens on now, outside the ephemeral range, not handed out before here."""
    with _lock:
        for _ in range(2000):
            port = _draw.randrange(*PORT_RANGE)
            if port not in _handed_out and ports_free([port]):
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free loopback port in {PORT_RANGE}")


def ports_free(ports: list[int]) -> bool:
    """True when every port in `ports` can be bound on loopback now."""
    sockets = []
    try:
        for port in ports:
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for sock in sockets:
            sock.close()


def free_port_block(count: int, *, step: int = 1) -> int:
    """First port of `count` free loopback ports `step` apart (base, base + step, ...)."""
    for _ in range(200):
        base = free_port()
        ports = [base + i * step for i in range(count)]
        with _lock:
            if ports[-1] < PORT_RANGE[1] and not _handed_out.intersection(ports[1:]) and ports_free(ports):
                _handed_out.update(ports)
                return base
    raise RuntimeError(f"no block of {count} free ports {step} apart")


def isolated_stack_env(root: Path, *, replicas: int = 1, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a stack on free ports with its state folder `root` (never the developer's stack).

    `deploy/.env` gives credentials and settings, `environ` (default: the process environment) overrides
    them, and every address, the object store's internal ports and the state folder are then replaced.
    Texture replicas take ports `EXTRA_REPLICA_PORT_STEP` apart, all checked free; so do the metrics ports.
    """
    base = {
        k: v for k, v in (os.environ if environ is None else environ).items() if not k.startswith(("MAKE", "MFLAGS"))
    }
    env = stack_environment(base)
    env.pop("A2V_MODELS_DIR", None)  # the models live in the stack's own folder
    env.update(
        {
            "A2V_STACK_DIR": str(root),
            "A2V_S3_ENDPOINT": f"127.0.0.1:{free_port()}",
            "A2V_WEED_PORT_BASE": str(free_port_block(WEED_PORT_COUNT)),
            "A2V_TEXTURE_REPLICAS": str(max(1, replicas)),
        }
    )
    for component in STACK_COMPONENTS:
        count = max(1, replicas) if component.name == "texture" else 1
        port = free_port_block(count, step=EXTRA_REPLICA_PORT_STEP)
        env[f"A2V_{component.name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        metrics = free_port_block(count, step=EXTRA_REPLICA_PORT_STEP)
        while metrics == port:  # nothing listens on either yet: the OS may hand out the same one twice
            metrics = free_port_block(count, step=EXTRA_REPLICA_PORT_STEP)
        env[f"A2V_{component.name.upper()}_METRICS_PORT"] = str(metrics)
    ours = {f"A2V_{component.name.upper()}_ADDR" for component in STACK_COMPONENTS}
    for key in [k for k in env if k.startswith("A2V_") and k.endswith("_ADDR") and k not in ours]:
        env[key] = f"127.0.0.1:{free_port()}"  # addresses of services this stack does not start: none shared
    return env
