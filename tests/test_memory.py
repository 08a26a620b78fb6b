"""What a delay cap remembers (pure logic): bounded, and still useful past its bound."""

from __future__ import annotations

import gc
import time

import pytest

import natsmw.delay.memory
from natsmw.delay.memory import Deliveries
from natsmw.delay.stores import DeadlineKey, Deferral


class Client:
    pass


def holds(memory: Deliveries, client: Client, deferred: int, rounds: int) -> float:
    """Defer ``deferred`` messages, then hold each of them ``rounds`` times in the order they
    were deferred (as a consumer redelivers them): the share of holds answered from memory."""
    deferral = Deferral(deadline=time.time() + 3600)
    for sequence in range(1, deferred + 1):
        memory.seen(DeadlineKey("S", "c", sequence), client, deferral, 1)
    hits = 0
    for delivery in range(2, rounds + 2):
        for sequence in range(1, deferred + 1):
            key = DeadlineKey("S", "c", sequence)
            entry = memory.recall(key, client, delivery)
            hits += entry is not None
            memory.held(entry, key, client, deferral, delivery)
    return hits / (deferred * rounds)


@pytest.mark.parametrize("times", [1.1, 2, 10])
def test_past_its_limit_the_memory_still_answers_limit_over_n_of_the_holds(times: float) -> None:
    """Forgetting the oldest when full turns every hold into a miss past the limit (held
    messages come back in the order they were deferred)."""
    memory = Deliveries(limit=1000)
    rate = holds(memory, Client(), int(1000 * times), rounds=5)
    assert rate >= 1 / times
    assert len(memory) <= 1000


def test_unused_entries_go_full_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(natsmw.delay.memory.time, "monotonic", lambda: now[0])
    memory = Deliveries(limit=1000, idle=60.0)
    client = Client()
    for sequence in range(1, 11):  # a consumer deleted with these outstanding
        memory.seen(DeadlineKey("S", "gone", sequence), client, None, 1)
    kept = DeadlineKey("S", "c", 1)
    for minute in range(1, 4):
        now[0] += 60.0
        entry = memory.recall(kept, client, minute + 1)  # in use: comes back every minute
        memory.seen(kept, client, None, minute + 1)
        assert minute == 1 or entry is not None
        memory.seen(DeadlineKey("S", "c", 100 + minute), client, None, 1)
    assert memory.last_delivery(DeadlineKey("S", "gone", 1), client) is None
    assert memory.last_delivery(kept, client) == 4
    assert len(memory) == 3  # kept, and the two newest of the others


def test_full_of_entries_in_use_a_new_one_waits_unless_only_memory_knows_it() -> None:
    memory = Deliveries(limit=10)
    client = Client()
    for sequence in range(10):
        memory.seen(DeadlineKey("S", "c", sequence), client, None, 1)
    memory.seen(DeadlineKey("S", "c", 10), client, None, 1)
    assert memory.last_delivery(DeadlineKey("S", "c", 10), client) is None
    assert memory.last_delivery(DeadlineKey("S", "c", 0), client) == 1  # not pushed out
    memory.seen(DeadlineKey("S", "c", 11), client, None, 1, force=True)
    assert memory.last_delivery(DeadlineKey("S", "c", 11), client) == 1


def test_an_entry_costs_no_copy_of_the_names() -> None:
    import tracemalloc

    memory = Deliveries(limit=10**6)
    client = Client()
    replies = [f"$JS.ACK.ORDERS.order-workers.1.{n}.{n}.0.0".split(".") for n in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for tokens in replies:  # names parsed anew from every reply subject, as the cap does
            memory.seen(DeadlineKey(tokens[2], tokens[3], int(tokens[5])), client, None, 1)
        del tokens
        gc.collect()
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(replies)
    finally:
        tracemalloc.stop()
    assert per_entry < 200  # was ~360 B with the names and the key kept in every entry


def test_a_deferral_only_memory_knows_is_kept_until_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its store write failed, so its nak went uncapped and nothing uses the entry until
    then; swept, a redelivery that comes early (after a server restart) would run early."""
    now = [1000.0]
    monkeypatch.setattr(natsmw.delay.memory.time, "monotonic", lambda: now[0])
    memory = Deliveries(limit=1000, idle=60.0)
    client = Client()
    unrecorded = DeadlineKey("S", "c", 1)
    memory.seen(unrecorded, client, Deferral(deadline=time.time() + 600), 1, force=True)
    for minute in range(1, 12):  # ten minutes of other traffic, a sweep each minute
        now[0] += 60.0
        memory.seen(DeadlineKey("S", "c", 100 + minute), client, None, 1)
        assert memory.last_delivery(unrecorded, client) == 1, minute
    for minute in range(12, 16):
        now[0] += 60.0
        memory.seen(DeadlineKey("S", "c", 100 + minute), client, None, 1)
    assert memory.last_delivery(unrecorded, client) is None  # past its deadline: it goes
