"""LatestSlot: newest wins, skipped counted, get waits without polling, close wakes."""

import threading

from regseg.stream.slot import LatestSlot


def test_latest_item_wins_and_skips_are_counted():
    slot = LatestSlot()
    for i in range(5):
        slot.put(i)
    assert slot.get(timeout=0) == 4
    assert slot.skipped == 4
    assert slot.get(timeout=0.01) is None


def test_get_wakes_on_put_from_another_thread():
    slot = LatestSlot()
    got = []
    ready = threading.Event()

    def consumer():
        ready.set()
        got.append(slot.get(timeout=5))

    t = threading.Thread(target=consumer)
    t.start()
    ready.wait(5)
    slot.put("frame")
    t.join(5)
    assert got == ["frame"]


def test_close_wakes_waiters_and_returns_none():
    slot = LatestSlot()
    got = []
    t = threading.Thread(target=lambda: got.append(slot.get(timeout=5)))
    t.start()
    slot.close()
    t.join(5)
    assert got == [None] and not t.is_alive()
