"""The MQTT intake's de-duplication window (``agent.intake.mqtt.SeenRequests``) on its own: entries
leave at their expiry, a full window evicts the entry nearest its expiry, and an entry is small
(the window holds one per request for its deadline plus the grace: issue 21's RSS target)."""
from __future__ import annotations

import tracemalloc

from agent.intake.mqtt import SeenRequests, request_key


def _key(n: int) -> bytes:
    return request_key(f"apps/a/replies/{n}", n.to_bytes(4, "big"))


def test_an_entry_is_seen_until_its_expiry_and_then_forgotten():
    seen = SeenRequests(100)
    seen.add(_key(1), expiry=10.0, now=0.0)
    assert seen.seen(_key(1), 9.9) and not seen.seen(_key(2), 9.9)
    assert not seen.seen(_key(1), 10.0)
    seen.add(_key(2), expiry=30.0, now=20.0)        # an add sweeps what has expired
    assert _key(1) not in seen and len(seen) == 1


def test_a_full_window_evicts_the_entry_nearest_its_expiry_and_counts_it():
    seen = SeenRequests(3)
    for n, expiry in ((1, 50.0), (2, 20.0), (3, 40.0)):
        assert seen.add(_key(n), expiry, now=0.0) == 0
    assert seen.add(_key(4), 60.0, now=0.0) == 1
    assert set(seen.keys()) == {_key(1), _key(3), _key(4)}


def test_equal_expiries_and_a_re_added_key_keep_one_live_entry_each():
    seen = SeenRequests(10)
    for n in range(5):
        seen.add(_key(n), 10.0, now=0.0)             # ties order by key
    seen.add(_key(0), 20.0, now=0.0)                 # re-added later: its old expiry is stale
    seen.add(_key(9), 30.0, now=15.0)                # sweeps 1-4 at 10.0, keeps 0 until 20.0
    assert set(seen.keys()) == {_key(0), _key(9)}
    assert seen.seen(_key(0), 19.0) and not seen.seen(_key(0), 20.0)


def test_an_entry_costs_under_140_bytes_beside_its_key():
    keys = [_key(n) for n in range(20000)]
    seen = SeenRequests(65536)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, key in enumerate(keys):
            seen.add(key, 100.0 + (n * 7919 % 4000) / 100, now=0.0)
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(keys)
    finally:
        tracemalloc.stop()
    # ~117 bytes (dict slot, expiry, heap tuple and slot); with a tie-break counter in each heap
    # entry it was ~158.
    assert per_entry < 140, f"{per_entry:.0f} bytes per entry"
