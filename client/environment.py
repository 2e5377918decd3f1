"""Where the stack is, as every client of the stack reads it.

`deploy/.env` (the local stack's addresses and development credentials) overlaid with the process environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

ENV_FILE = Path(__file__).resolve().parent.parent / "deploy" / ".env"


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
    return merged
