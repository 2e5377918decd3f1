"""Where the stack is, as every client of the stack reads it.

`deploy/.env` (the local stack's addresses and development credentials) overlaid with the process environment; with
A2V_TLS on, the local stack's throwaway CA, client certificate and token (made by `a2v up`) unless the environment
names others.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV_FILE = REPO / "deploy" / ".env"
PKI_FOLDER = "pki"
"""The local stack's TLS files and tokens, under its folder (A2V_STACK_DIR, default `.a2v/`; deploy/pki.py)."""
CLIENT_TOKEN_FILE = "a2v.token"
SERVICE_TOKEN_FILE = "services.token"
TOKENS_FILE = "tokens.json"


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines (comments and blanks ignored)."""
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def stack_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`deploy/.env` overlaid with the process environment (the environment wins)."""
    merged = read_env_file()
    merged.update(os.environ if environ is None else environ)
    if merged.get("A2V_TLS", "").strip().lower() in ("1", "true", "yes", "on"):
        for key, value in local_client_security(merged).items():
            merged.setdefault(key, value)
    return merged


def pki_folder(environ: Mapping[str, str]) -> Path:
    """Where the local stack keeps its CA, certificate and tokens."""
    return Path(environ.get("A2V_STACK_DIR") or REPO / ".a2v") / PKI_FOLDER


def local_client_security(environ: Mapping[str, str]) -> dict[str, str]:
    """The A2V_TLS_ and token variables of a client of the local stack with TLS on (mTLS, the `a2v` caller)."""
    folder = pki_folder(environ)
    return {
        "A2V_TLS_CA": str(folder / "ca.pem"),
        "A2V_TLS_CERT": str(folder / "service.pem"),
        "A2V_TLS_KEY": str(folder / "service-key.pem"),
        "A2V_TLS_SERVER_NAME": "localhost",
        "A2V_AUTH_TOKEN_FILE": str(folder / CLIENT_TOKEN_FILE),
    }
