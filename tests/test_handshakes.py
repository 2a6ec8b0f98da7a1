"""The policy on connections that have not proved the key (shared by the tcp and zmq job servers), alone:
who makes room for a newcomer, when, and whose deadline has passed. Sans I/O: times are given."""

from __future__ import annotations

import pytest

from remote_executor.jobserver.handshakes import Handshakes


def test_the_cap_and_the_counts_per_address() -> None:
    waiting: Handshakes[int] = Handshakes(limit=3, timeout=10.0)
    for key, host in enumerate(["a", "a", "b"]):
        assert not waiting.full()
        waiting.add(key, host, now=0.0)
    assert waiting.full() and len(waiting) == 3
    assert (waiting.count("a"), waiting.count("b"), waiting.count("c")) == (2, 1, 0)
    waiting.remove(0)
    waiting.remove(0)  # (gone already: nothing)
    assert not waiting.full() and waiting.count("a") == 1 and 0 not in waiting


def test_a_newcomer_from_a_quieter_address_takes_the_place_of_the_busiest_addresses_oldest_at_once() -> None:
    waiting: Handshakes[int] = Handshakes(limit=3, timeout=10.0)
    waiting.add(1, "flood", 0.0)
    waiting.add(2, "flood", 0.1)
    waiting.add(3, "other", 0.2)
    assert waiting.victim("newcomer", now=0.3) == 1  # at once: fewer places than the flood's
    assert waiting.victim("flood", now=0.3) is None  # one of its own: not before a fair chance
    assert waiting.victim(None, now=0.3) is None
    assert waiting.victim("flood", now=1.0) == 1  # the oldest has had its chance (a quarter, at most 1 s)


def test_the_fair_chance_is_a_quarter_of_the_deadline_at_most_a_second() -> None:
    assert Handshakes[int](limit=1, timeout=2.0).evictable_after == 0.5
    assert Handshakes[int](limit=1, timeout=60.0).evictable_after == 1.0


def test_deadlines_oldest_first() -> None:
    waiting: Handshakes[str] = Handshakes(limit=8, timeout=5.0)
    assert waiting.overdue(100.0) is None and waiting.next_deadline() is None
    waiting.add("x", "h", 1.0)
    waiting.add("y", "h", 2.0)
    assert waiting.next_deadline() == 6.0
    assert waiting.overdue(5.9) is None
    assert waiting.overdue(6.0) == "x"
    waiting.remove("x")
    assert waiting.overdue(6.5) is None and waiting.next_deadline() == 7.0


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_handshaking must be at least 1"):
        Handshakes[int](limit=0, timeout=1.0)
