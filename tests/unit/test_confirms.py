"""The confirm window: delivery tags back to messages, single and multiple acks, new channels."""

from __future__ import annotations

from relay.confirms import ConfirmWindow


def window_of(count: int) -> ConfirmWindow:
    window = ConfirmWindow()
    window.published((100 + i, f"m{i}") for i in range(1, count + 1))  # delivery tags 1..count
    return window


def test_multiple_ack_settles_everything_up_to_its_tag() -> None:
    window = window_of(5)
    assert window.settle(3, multiple=True) == [(101, "m1"), (102, "m2"), (103, "m3")]
    assert len(window) == 2
    assert window.settle(3, multiple=True) == []  # already settled
    assert window.settle(0, multiple=True) == [(104, "m4"), (105, "m5")]  # 0: all outstanding
    assert len(window) == 0


def test_single_acks_out_of_order_settle_once_each() -> None:
    window = window_of(4)
    assert window.settle(2, multiple=False) == [(102, "m2")]
    assert window.settle(2, multiple=False) == []
    assert window.settle(1, multiple=False) == [(101, "m1")]
    assert len(window) == 2
    assert window.settle(4, multiple=True) == [(103, "m3"), (104, "m4")]
    window.published([(200, "later")])  # delivery tag 5
    assert window.settle(5, multiple=False) == [(200, "later")]


def test_a_lost_channel_hands_everything_back_and_a_new_one_counts_from_one() -> None:
    window = window_of(3)
    window.settle(1, multiple=False)
    assert window.take_all() == [(102, "m2"), (103, "m3")]
    assert len(window) == 0
    assert window.new_channel() == []
    window.published([(300, "again")])
    assert window.settle(1, multiple=False) == [(300, "again")]
