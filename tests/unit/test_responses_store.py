"""The stored-response store: bounded by count and by age, on a fake clock."""

from __future__ import annotations

import pytest

from trioserve.api.dialects.responses.store import (
    DEFAULT_MAX_AGE_S,
    DEFAULT_MAX_ENTRIES,
    ResponseStore,
    StoredResponse,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def response(i: int) -> dict:
    return {"id": f"resp_{i}", "object": "response", "status": "completed"}


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]


def store_with(n: int, **kwargs) -> tuple[ResponseStore, FakeClock]:
    clock = FakeClock()
    store = ResponseStore(clock=clock, **kwargs)
    for i in range(n):
        store.put(f"resp_{i}", response(i), conversation(i))
        clock.now += 1
    return store, clock


def test_defaults_are_sensible():
    store = ResponseStore()
    assert (store.max_entries, store.max_age_s) == (DEFAULT_MAX_ENTRIES, DEFAULT_MAX_AGE_S)
    assert (DEFAULT_MAX_ENTRIES, DEFAULT_MAX_AGE_S) == (256, 3600.0)


def test_put_then_get_returns_the_response_and_its_conversation():
    store, clock = store_with(0)
    store.put("resp_1", response(1), conversation(1))
    got = store.get("resp_1")
    assert got == StoredResponse("resp_1", response(1), tuple(conversation(1)), clock.now)
    assert isinstance(got.conversation, tuple)
    assert "resp_1" in store and len(store) == 1


def test_an_unknown_id_is_none():
    store, _ = store_with(3)
    assert store.get("resp_nope") is None
    assert "resp_nope" not in store and 5 not in store


def test_delete_forgets_and_says_whether_there_was_one():
    store, _ = store_with(2)
    assert store.delete("resp_0") is True
    assert store.get("resp_0") is None
    assert store.delete("resp_0") is False
    assert store.delete("resp_never") is False
    assert store.get("resp_1") is not None and len(store) == 1


def test_the_oldest_go_first_beyond_max_entries():
    store, _ = store_with(5, max_entries=3)
    assert len(store) == 3
    assert [store.get(f"resp_{i}") is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_a_second_put_of_an_id_replaces_it_as_the_newest():
    store, clock = store_with(3, max_entries=3)
    store.put("resp_0", {"id": "resp_0", "v": 2}, [])
    assert store.get("resp_0").response == {"id": "resp_0", "v": 2}
    assert store.get("resp_0").stored_at == clock.now
    store.put("resp_3", response(3), conversation(3))  # evicts resp_1, now the oldest
    assert store.get("resp_1") is None
    assert store.get("resp_0") is not None and len(store) == 3


def test_a_get_does_not_make_an_entry_younger():
    store, _ = store_with(2, max_entries=2)
    assert store.get("resp_0") is not None
    store.put("resp_2", response(2), [])
    assert store.get("resp_0") is None and store.get("resp_1") is not None


def test_expired_entries_are_gone_on_get():
    store, clock = store_with(1, max_age_s=60)
    clock.now += 58  # stored at 1000, now 1059: 59 s old
    assert store.get("resp_0") is not None
    clock.now += 1  # 60 s old: expired
    assert store.get("resp_0") is None
    assert len(store._entries) == 0  # dropped, not just hidden


def test_expired_entries_are_dropped_on_put_without_being_asked_for():
    store, clock = store_with(3, max_age_s=10)  # stored at 1000, 1001, 1002
    clock.now = 1011.5  # resp_0 and resp_1 expired, resp_2 not
    store.put("resp_9", response(9), [])
    assert list(store._entries) == ["resp_2", "resp_9"]


def test_len_counts_only_live_entries():
    store, clock = store_with(3, max_age_s=10)
    assert len(store) == 3
    clock.now += 100
    assert len(store) == 0


def test_delete_of_an_expired_entry_is_false():
    store, clock = store_with(1, max_age_s=10)
    clock.now += 11
    assert store.delete("resp_0") is False
    assert len(store._entries) == 0


def test_growth_is_bounded_under_many_puts():
    store, clock = store_with(0, max_entries=8, max_age_s=1e9)
    for i in range(10_000):
        store.put(f"resp_{i}", response(i), [])
        clock.now += 0.001
    assert len(store._entries) == 8
    assert store.get("resp_9999") is not None and store.get("resp_9991") is None


def test_zero_entries_keeps_nothing():
    store, _ = store_with(3, max_entries=0)
    assert len(store) == 0 and store.get("resp_0") is None


@pytest.mark.parametrize("kwargs", [{"max_entries": -1}, {"max_age_s": 0}, {"max_age_s": -5}])
def test_bad_limits_are_refused(kwargs):
    with pytest.raises(ValueError):
        ResponseStore(**kwargs)


def test_the_real_clock_is_the_default():
    store = ResponseStore(max_entries=2, max_age_s=3600)
    store.put("resp_a", response(0), [])
    assert store.get("resp_a").response == response(0)
