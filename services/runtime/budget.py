"""A replica's memory and scratch disk, shared by its calls: work that cannot fit is refused before it starts."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from services.runtime.config import MIB
from services.runtime.errors import TooLarge


def mib(amount: int) -> str:
    """An amount of bytes in MiB, for messages."""
    return f"{amount / MIB:,.0f} MiB"


class Busy(TooLarge):
    """The replica has room for the work, but not while its other calls hold it.

    RESOURCE_EXHAUSTED that the orchestrator tries again later (the detail starts like the server's own refusal,
    `clients.is_busy`).
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"server busy: {message}")


class Budget:
    """Bytes of one resource that concurrent calls reserve while they work.

    A reservation larger than the whole budget can never succeed: TooLarge, naming the limit and its variable.
    One that fits but not beside the reservations held now is Busy. Nothing waits: a call refused as busy is
    made again later by the orchestrator, perhaps on another replica.
    """

    def __init__(self, total_bytes: int, *, what: str, variable: str) -> None:
        self.total = int(total_bytes)
        self.what, self.variable = what, variable
        self.used = 0
        self.lock = threading.Lock()

    @contextmanager
    def reserve(self, amount: int, purpose: str) -> Iterator[None]:
        """Hold `amount` bytes while the block runs; TooLarge when it never fits, Busy when it does not fit now."""
        amount = max(0, int(amount))
        if amount > self.total:
            raise TooLarge(
                f"{purpose} needs {mib(amount)} of {self.what}, more than this replica has ({mib(self.total)}, "
                f"{self.variable})"
            )
        with self.lock:
            if self.used + amount > self.total:
                raise Busy(f"{purpose} needs {mib(amount)} of {self.what}; {mib(self.total - self.used)} are free")
            self.used += amount
        try:
            yield
        finally:
            with self.lock:
                self.used -= amount
