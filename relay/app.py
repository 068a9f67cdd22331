"""Wiring: builds a relay and its collaborators from settings. The only place that knows
which concrete store, publisher and listener go together."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay.deadline import Watchdog
from relay.listener import Listener
from relay.mailbox import LoopMailbox
from relay.messages import Sink
from relay.metrics import Metrics
from relay.publisher import AmqpPublisher
from relay.relay import Mail, Relay
from relay.settings import RelaySettings
from relay.store import Store, create_engine

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


def build_store(settings: RelaySettings, *, watchdog: Watchdog | None = None) -> Store:
    engine = create_engine(
        settings.database_url,
        application_name=f"outbox-relay:{settings.name}",
        db_timeout=settings.db_timeout,
        idle_in_transaction_timeout=max(1.0, min(settings.db_timeout, settings.lease / 4)),
    )
    return Store(
        engine,
        settings.outbox(),
        db_timeout=settings.db_timeout,
        watchdog=watchdog,
        keep_connections=True,
    )


def build_relay(
    settings: RelaySettings,
    *,
    metrics: Metrics | None = None,
    tracer_provider: TracerProvider | None = None,
) -> Relay:
    """`tracer_provider`: for the relay's PRODUCER spans; the global one when None."""
    store = build_store(settings, watchdog=Watchdog())
    # One loop, run by the relay's thread while it waits, carries the broker connection:
    # confirms are handled where they are read (relay/mailbox.py says why).
    mailbox: LoopMailbox[Mail] = LoopMailbox(asyncio.new_event_loop())

    def publisher(sink: Sink) -> AmqpPublisher:
        return AmqpPublisher(
            settings.amqp_url,
            sink,
            connection_name=f"outbox-relay:{settings.name}",
            exchange=settings.exchange,
            exchange_type=settings.exchange_type,
            declare_exchange=settings.declare_exchange,
            loop=mailbox.loop,
        )

    listener: Callable[[Callable[[], None]], Listener] | None = None
    if settings.listen and store.engine.dialect.name == "postgresql":
        channel = settings.outbox().channel

        def listener(wake: Callable[[], None]) -> Listener:
            return Listener(
                settings.database_url,
                channel,
                wake,
                loop=mailbox.loop,
                application_name=f"outbox-relay:{settings.name}:listen",
            )

    return Relay(
        settings,
        store,
        publisher,
        listener_factory=listener,
        metrics=metrics,
        mailbox=mailbox,
        tracer_provider=tracer_provider,
        claims_here=True,
    )
