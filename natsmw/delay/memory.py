"""What one delay cap remembers of the deliveries it saw: one owner for that state."""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass

from natsmw.delay.stores import DeadlineKey, Deferral

__all__ = ["Deliveries", "Remembered"]

_LIMIT = 100_000
_IDLE = 60.0


@dataclass(slots=True)
class Remembered:
    """What this instance knows of one message: its deferral, the last delivery it saw, the
    sweep in which it was last used, and when (monotonic) its deferral was last written or
    read from the store (``inf``: only this instance knows it; never read again)."""

    deferral: Deferral | None
    last_delivery: int
    used: int
    checked: float


# (id(client), stream, consumer): the same names may exist on two servers. The entries of a
# client go when it does, so an id is never taken for a later client's.
_Group = tuple[int, str, str]


class Deliveries:
    """The messages a delay cap may see again, and what it knows of each.

    Held messages come back in the order they were deferred, so forgetting the oldest when
    full would make every hold a miss once there are more than ``limit``. Instead, when full,
    a new message is remembered only in place of one unused for ``idle`` seconds: the
    ``limit`` messages remembered keep their hits (at least ``limit / N`` of the holds of N
    deferred messages), the others cost one store read each time they come back. Entries
    unused for two sweeps (``idle`` to ``2 * idle`` seconds) go, full or not: a consumer
    deleted with messages outstanding leaves nothing behind for long.

    Entries are grouped by client and consumer: the names are kept once per group, not once
    per message.
    """

    def __init__(self, limit: int = _LIMIT, idle: float = _IDLE) -> None:
        self._groups: dict[_Group, dict[int, Remembered]] = {}
        self._count = 0
        self._limit = limit
        self._idle = idle
        self._sweep = 0  # entries used since the last sweep carry its number
        self._next_sweep = time.monotonic() + idle
        self._clients: set[int] = set()  # clients with entries, each with a finalizer

    def __len__(self) -> int:
        return self._count

    def recall(self, key: DeadlineKey, client: object, delivery: int) -> Remembered | None:
        """What is known of ``key`` on ``client``, if it can be about this very delivery.

        Not when it claims a delivery this one does not follow (a stream or consumer
        recreated under the same names): then it is forgotten.
        """
        group = self._groups.get((id(client), key.stream, key.consumer))
        if group is None:
            return None
        entry = group.get(key.sequence)
        if entry is None:
            return None
        if entry.last_delivery >= delivery:
            self._drop(group, (id(client), key.stream, key.consumer), key.sequence)
            return None
        if entry.used < self._sweep:  # never earlier than it was kept until
            entry.used = self._sweep
        return entry

    def unknown(self, client: object, stream: str, consumer: str, sequence: str) -> bool:
        """Whether nothing is remembered of message ``sequence`` (as its reply subject spells
        it) of ``stream``/``consumer`` on ``client``: no recall could be about it."""
        group = self._groups.get((id(client), stream, consumer))
        return group is None or int(sequence) not in group

    def seen(
        self,
        key: DeadlineKey,
        client: object,
        deferral: Deferral | None,
        delivery: int,
        *,
        force: bool = False,
    ) -> None:
        """Delivery ``delivery`` of ``key`` was seen, with ``deferral`` (deferred, released or
        a first run that may come back). ``force``: what the store could not keep: remembered
        past the limit, and until its deadline however long it goes unused (it is the only
        record of that deadline: a redelivery that comes early, after a server restart, must
        still be held)."""
        ahead = 0  # sweeps to keep it through however unused
        checked = time.monotonic()
        if force and deferral is not None:
            ahead = int(max(deferral.deadline - time.time(), 0.0) / self._idle) + 2
            checked = math.inf
        name = (id(client), key.stream, key.consumer)
        group = self._groups.get(name)
        if group is not None:
            entry = group.get(key.sequence)
            if entry is not None:
                entry.deferral = deferral
                entry.last_delivery = delivery
                entry.used = self._sweep + ahead
                entry.checked = checked
                return
        if time.monotonic() >= self._next_sweep:
            self._forget_unused()
            group = self._groups.get(name)
        if self._count >= self._limit and not force:
            return  # full of messages in use: this one costs a store read when it comes back
        if group is None:
            if name[0] not in self._clients:
                # Held by id, not by reference: a closed client is not kept alive by natsmw,
                # and what was remembered of it goes with it. Through a weak reference: a
                # delay cap dropped before its client is freed.
                self._clients.add(name[0])
                weakref.finalize(client, _forget_client, weakref.ref(self), name[0])
            group = self._groups[name] = {}
        group[key.sequence] = Remembered(deferral, delivery, self._sweep + ahead, checked)
        self._count += 1

    def held(self, entry: Remembered | None, key: DeadlineKey, client: object,
             deferral: Deferral, delivery: int) -> None:  # fmt: skip
        """Delivery ``delivery`` was held under ``deferral``."""
        if entry is not None and entry.deferral is deferral:
            entry.last_delivery = delivery  # the usual hold: same deadline, one delivery later
            if entry.used < self._sweep:
                entry.used = self._sweep
        else:  # unknown before
            self.seen(key, client, deferral, delivery)

    def last_delivery(self, key: DeadlineKey, client: object) -> int | None:
        group = self._groups.get((id(client), key.stream, key.consumer))
        entry = None if group is None else group.get(key.sequence)
        return None if entry is None else entry.last_delivery

    def gone(self, key: DeadlineKey, client: object) -> None:
        """``key`` will not come back to this consumer (acked, termed or parked)."""
        name = (id(client), key.stream, key.consumer)
        group = self._groups.get(name)
        if group is not None and key.sequence in group:
            self._drop(group, name, key.sequence)

    def _drop(self, group: dict[int, Remembered], name: _Group, sequence: int) -> None:
        del group[sequence]
        self._count -= 1
        if not group:
            del self._groups[name]

    def _forget_unused(self) -> None:
        """Forget what was not used since the last sweep."""
        # A collected client's finalizer may run inside this loop (at any allocation) and
        # take its groups away: iterate over a copy made without allocating per item, and
        # check each group is still there after each step that allocates.
        for name in list(self._groups):
            group = self._groups.get(name)
            if group is None:
                continue
            unused = [sequence for sequence, entry in group.items() if entry.used < self._sweep]
            if self._groups.get(name) is not group:
                continue
            for sequence in unused:
                del group[sequence]
            self._count -= len(unused)
            if not group:
                del self._groups[name]
        self._sweep += 1
        self._next_sweep = time.monotonic() + self._idle

    def _forget_client(self, client: int) -> None:
        self._clients.discard(client)
        for name in list(self._groups):  # see _forget_unused
            if name[0] == client:
                group = self._groups.pop(name, None)
                if group is not None:
                    self._count -= len(group)


def _forget_client(memory: weakref.ref[Deliveries], client: int) -> None:
    remembered = memory()
    if remembered is not None:
        remembered._forget_client(client)
