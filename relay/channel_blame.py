"""Which unconfirmed messages a channel closed by the broker is the fault of.

When a publish breaks a rule (too large, a missing exchange, no permission), RabbitMQ closes the
whole channel. Every message published on it and not yet confirmed then has no confirm coming,
but most of them did nothing wrong: those routed before the offending frame are already
enqueued, those after it were discarded. Spending an attempt on each of them, as if the broker
had refused it, lets one poison message burn the attempts of a whole window (and send a
window of duplicates on every retry).

Why this is safe: a message that is not blamed comes back UNKNOWN, which republishes it with
the same message_id and spends no attempt, exactly as for a lost connection; a duplicate is the
worst that can happen to it. A blamed message spends one attempt (or goes dead at once when no
retry can help), so a true poison message always reaches dead and never loops. When the
broker's reply names no message, exactly one is blamed: the earliest unconfirmed one, so every
close still spends at most one attempt and a message that fails every time still ends dead.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

#: RabbitMQ's default `max_message_size` (3.8 and later): 128 MiB. A broker configured lower
#: says so when it closes the channel, and the publisher adopts its figure from then on.
DEFAULT_MAX_MESSAGE_SIZE = 134_217_728

# rabbit_channel:check_msg_size: "message size ~B is larger than [configured ]max size ~B".
_TOO_LARGE = re.compile(r"message size (\d+) is larger than (?:configured )?max size (\d+)")
# 404 "no exchange 'x' in vhost '/'", 403 "access to exchange 'x' in vhost '/' refused ...".
# RabbitMQ quotes the name raw (no escapes): take everything up to the last "' in vhost".
_EXCHANGE = re.compile(r"exchange '(.*)' in vhost '")

_NOT_FOUND = 404
_ACCESS_REFUSED = 403
_PRECONDITION_FAILED = 406


class Sent(NamedTuple):
    """What the publisher remembers of a message waiting for its confirm (a named tuple:
    made once per message, see `relay.records.ClaimedEvent`)."""

    tag: int
    exchange: str
    size: int  # body bytes: what the broker compares with max_message_size


@dataclasses.dataclass(frozen=True, slots=True)
class Blame:
    """The verdict on a channel close: `blamed` tags are refused (`retryable` says whether
    another attempt can help), every other unconfirmed message's fate is unknown."""

    blamed: frozenset[int]
    error: str
    retryable: bool = True
    max_message_size: int | None = None  # the broker's limit, when its reply states it


def too_large_error(size: int, limit: int) -> str:
    return (
        f"message body of {size} bytes is larger than the broker's max_message_size of "
        f"{limit} bytes: no retry can deliver it; make the event smaller, or raise "
        "max_message_size on the broker and requeue it (outbox-relay dead requeue)"
    )


def blame(reply_code: int | None, reply_text: str, sent: Sequence[Sent]) -> Blame:
    """The verdict for a channel the broker closed with `reply_code`/`reply_text`, given the
    unconfirmed messages in the order they were published."""
    description = f"channel closed: {reply_code} {reply_text}"
    if not sent:
        return Blame(frozenset(), description)
    if reply_code == _PRECONDITION_FAILED:
        match = _TOO_LARGE.search(reply_text)
        if match:
            size, limit = int(match.group(1)), int(match.group(2))
            blamed = frozenset(s.tag for s in sent if s.size > limit)
            if blamed:
                return Blame(
                    blamed, too_large_error(size, limit), retryable=False, max_message_size=limit
                )
    if reply_code in (_NOT_FOUND, _ACCESS_REFUSED):
        match = _EXCHANGE.search(reply_text)
        if match:
            exchange = match.group(1)
            # Every one of them would fail the same way: they do not merely share the channel.
            blamed = frozenset(s.tag for s in sent if s.exchange == exchange)
            if blamed:
                return Blame(blamed, description)
    return Blame(frozenset({sent[0].tag}), description)


# Headers RabbitMQ reads itself (sender-selected distribution): they must be arrays of strings,
# or the broker closes the channel with a reply that names no message.
DISTRIBUTION_HEADERS = ("CC", "BCC")


def distribution_header_error(headers: Mapping[str, Any]) -> str | None:
    """Why the broker would refuse these headers, or None."""
    for name in DISTRIBUTION_HEADERS:
        value = headers.get(name)
        if value is not None and not (
            isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        ):
            return (
                f"header {name!r} must be an array of routing keys for RabbitMQ "
                f"(sender-selected distribution), got {type(value).__name__}: the broker would "
                "close the channel on it; rename the header"
            )
    return None
