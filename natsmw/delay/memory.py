"""What one delay cap remembers of the deliveries it saw: one owner for that state."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from itertools import islice

from natsmw.delay.stores import DeadlineKey, Deferral

__all__ = ["Deliveries", "Remembered"]

_LIMIT = 100_000


@dataclass(slots=True)
class Remembered:
    """What this instance knows of one message: its deferral, and the last delivery it saw,
    on which client (``id()``: the same stream and consumer names may exist on two servers;
    the entries of a client go when it does, so an id is never taken for a later client's)."""

    deferral: Deferral | None
    last_delivery: int
    client: int


class Deliveries:
    """The messages a delay cap may see again, and what it knows of each.

    Bounded: past ``limit`` entries the oldest tenth is forgotten at once (O(1) per message);
    a forgotten message costs one store read when it comes back.
    """

    def __init__(self, limit: int = _LIMIT) -> None:
        self._entries: dict[DeadlineKey, Remembered] = {}
        self._limit = limit
        self._clients: set[int] = set()  # clients with entries, each with a finalizer

    def __len__(self) -> int:
        return len(self._entries)

    def recall(self, key: DeadlineKey, client: object, delivery: int) -> Remembered | None:
        """What is known of ``key``, if it can be about this very delivery.

        Not when it was learnt on another client, nor when it claims a delivery this one does
        not follow (a stream or consumer recreated under the same names): then it is forgotten.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.client != id(client) or entry.last_delivery >= delivery:
            del self._entries[key]
            return None
        return entry

    def seen(
        self, key: DeadlineKey, client: object, deferral: Deferral | None, delivery: int
    ) -> None:
        """Delivery ``delivery`` of ``key`` was seen, with ``deferral`` (deferred, released or
        a first run that may come back)."""
        held_by = id(client)
        if held_by not in self._clients:
            # Held by id, not by reference: a closed client is not kept alive by natsmw, and
            # what was remembered of it goes with it.
            self._clients.add(held_by)
            # Through a weak reference: a delay cap dropped before its client is freed.
            weakref.finalize(client, _forget_client, weakref.ref(self), held_by)
        self._entries[key] = Remembered(deferral, delivery, held_by)
        if len(self._entries) > self._limit:
            for old in list(islice(self._entries, self._limit // 10)):
                del self._entries[old]

    def held(self, key: DeadlineKey, entry: Remembered | None, client: object,
             deferral: Deferral, delivery: int) -> None:  # fmt: skip
        """Delivery ``delivery`` was held under ``deferral``."""
        if entry is not None and self._entries.get(key) is entry and entry.deferral is deferral:
            entry.last_delivery = delivery  # the usual hold: same deadline, one delivery later
        else:  # unknown before, or forgotten meanwhile
            self.seen(key, client, deferral, delivery)

    def last_delivery(self, key: DeadlineKey) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.last_delivery

    def _forget_client(self, client: int) -> None:
        self._clients.discard(client)
        for key in [key for key, entry in self._entries.items() if entry.client == client]:
            del self._entries[key]

    def gone(self, key: DeadlineKey) -> None:
        """``key`` will not come back to this consumer (acked, termed or parked)."""
        self._entries.pop(key, None)


def _forget_client(memory: weakref.ref[Deliveries], client: int) -> None:
    remembered = memory()
    if remembered is not None:
        remembered._forget_client(client)
