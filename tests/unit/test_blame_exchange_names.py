"""Exchange names holding a backslash or a quote are recognised in the broker's 404/403 reply
(found by review: the close fell back to blaming the earliest unconfirmed message).

The reply texts are exactly what RabbitMQ on 127.0.0.1:5672 answered during this review:
RabbitMQ quotes the name raw (no escaping), but channel_blame._EXCHANGE treats `\\.` as an
escape and stops at the first quote.
"""

from __future__ import annotations

import pytest

from relay.channel_blame import Sent, blame


@pytest.mark.parametrize("name", ["rev\\x_missing", "rev'q_missing"])
def test_missing_exchange_with_odd_name_blames_its_messages(name: str) -> None:
    bystander = Sent(tag=1, exchange="events", size=10)
    culprit = Sent(tag=2, exchange=name, size=10)
    verdict = blame(404, f"NOT_FOUND - no exchange '{name}' in vhost '/'", [bystander, culprit])
    assert verdict.blamed == frozenset({2}), verdict
