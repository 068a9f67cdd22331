"""A channel closed by the broker blames only the message(s) it is the fault of
(relay/channel_blame.py), and a refusal no retry can change ends the event at once."""

from __future__ import annotations

from pathlib import Path

from outbox import Event
from relay.channel_blame import Sent, blame
from relay.messages import Outcome, PublishOutcome
from tests.unit.test_relay_loop import Harness

WINDOW = [Sent(1, "orders", 10), Sent(2, "orders", 5000), Sent(3, "orders", 20)]


def test_too_large_blames_only_the_large_message_for_good_and_states_the_limit() -> None:
    # The broker's exact reply (rabbit_channel:check_msg_size, a configured limit).
    text = "PRECONDITION_FAILED - message size 5000 is larger than configured max size 4096"
    verdict = blame(406, text, WINDOW)
    assert verdict.blamed == {2}
    assert not verdict.retryable
    assert verdict.max_message_size == 4096
    assert "5000 bytes" in verdict.error and "4096" in verdict.error
    # The hard limit (no "configured") reads the same.
    hard = blame(406, "PRECONDITION_FAILED - message size 5000 is larger than max size 100", WINDOW)
    assert hard.blamed == {2} and hard.max_message_size == 100


def test_missing_or_forbidden_exchange_blames_the_messages_to_that_exchange() -> None:
    window = [
        Sent(1, "good", 1),
        Sent(2, "it's-gone", 1),
        Sent(3, "good", 1),
        Sent(4, "it's-gone", 1),
    ]
    # RabbitMQ quotes the name raw, without escaping its quote.
    missing = blame(404, "NOT_FOUND - no exchange 'it's-gone' in vhost '/'", window)
    assert missing.blamed == {2, 4} and missing.retryable
    forbidden = blame(
        403, "ACCESS_REFUSED - access to exchange 'good' in vhost '/' refused for user 'u'", window
    )
    assert forbidden.blamed == {1, 3}


def test_an_unidentifiable_close_blames_exactly_one_message_the_earliest() -> None:
    """At most one attempt per close, and a message that always fails still ends dead."""
    assert blame(505, "UNEXPECTED_FRAME - whatever", WINDOW).blamed == {1}
    # A size close that names a limit no message in the window exceeds: same fallback.
    text = "PRECONDITION_FAILED - message size 9 is larger than configured max size 100000"
    assert blame(406, text, WINDOW).blamed == {1}
    assert blame(406, "anything", []).blamed == frozenset()


def test_a_non_retryable_refusal_is_dead_at_its_first_attempt(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_attempts=10)
    h.write(Event(type="big", key="a"), Event(type="small", key="a"), Event(type="other", key="b"))
    h.step()
    big, other = h.publisher.outstanding
    h.publisher.outstanding = []
    h.publisher.sink(
        [
            PublishOutcome(big.tag, Outcome.REJECTED, "too large", retryable=False),
            PublishOutcome(other.tag, Outcome.CONFIRMED),
        ]
    )
    h.settle_and_step()
    rows = h.rows()
    assert [(r.type, r.status, r.attempts) for r in rows] == [
        ("big", "dead", 1),
        ("small", "pending", 0),  # held back behind its dead key head (the default)
        ("other", "published", 0),
    ]
    assert rows[0].last_error == "too large"
    h.engine.dispose()


def test_a_cc_or_bcc_header_that_is_not_a_list_of_routing_keys_is_refused_before_sending() -> None:
    """RabbitMQ reads CC and BCC itself and closes the channel, naming no message, on one
    that is not an array (found by review): such a message is refused for good here."""
    from relay.channel_blame import distribution_header_error

    assert distribution_header_error({"CC": "audit"}) is not None
    assert distribution_header_error({"BCC": ["a", 1]}) is not None
    assert distribution_header_error({"CC": ["audit", "billing"]}) is None
    assert distribution_header_error({"tenant": "acme"}) is None
