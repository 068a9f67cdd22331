"""What the benchmarks run with: one frozen object, made by the CLI (full or --quick)."""

from __future__ import annotations

import dataclasses
from typing import Any

from relay.urls import mask_url

DEFAULT_DATABASE_URL = "postgresql+psycopg://root@127.0.0.1:5432/outbox_bench"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BENCHMARKS = ("throughput", "latency", "backlog", "writer", "claims", "peer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    database_url: str = DEFAULT_DATABASE_URL
    amqp_url: str = DEFAULT_AMQP_URL
    quick: bool = False
    repeat: int = 3
    body_size: int = 200  # bytes of JSON payload, the message body
    # -- throughput: N committed events over K keys, relay vs raw pika --------------------
    n: int = 20_000
    keys: tuple[int, ...] = (1, 10, 100, 1000)
    window: int = 1000  # the raw pika baseline's confirm window
    # The window=K baseline publishes at most this many messages per slot of its window (so at
    # most 5,000 with one key, where one message in flight is slow and the rate does not
    # depend on the count; all N from 4 keys up at the default N, like the relay: a queue
    # fills more slowly as it grows, so fewer messages would flatter the baseline).
    window_k_messages_per_slot: int = 5000
    # -- latency: steady writers, commit-to-delivery ----------------------------------------
    rates: tuple[int, ...] = (200, 1000, 3000)
    latency_seconds: float = 10.0
    latency_warmup: float = 1.0  # events committed in the first seconds are not counted
    latency_keys: int = 100
    per_writer_rate: int = 400  # one writer process per this many events/s
    idle_warmup: float = 3.0
    idle_seconds: float = 10.0
    # -- backlog: the same pending events in a small and a big table --------------------------
    backlog_pending: int = 10_000
    backlog_small_rows: int = 10_000
    backlog_big_rows: int = 1_000_000
    backlog_keys: int = 100
    # -- writer cost: an application transaction with and without its event ----------------
    writer_transactions: int = 2000
    writer_block: int = 50  # transactions of one kind in a row; the kinds take turns
    writer_many_events: int = 10
    # -- claims: fairness behind a big key, work per event, claims with several relays --------
    fairness_backlog: int = 100_000
    work_keys: int = 100
    claimers: tuple[int, ...] = (1, 2, 4)
    claim_backlog: int = 100_000
    claim_keys: int = 20_000
    claim_seconds: float = 3.0
    # -- peer: ours against txoutbox, both relays in processes of their own ----------------
    peer_rates: tuple[int, ...] = (200, 600)
    peer_seconds: float = 10.0  # of writing, per latency run
    peer_warmup: float = 1.0
    peer_writers: int = 4
    peer_keys: int = 100
    peer_backlog: int = 20_000

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise ValueError(f"--repeat must be 1 or more, got {self.repeat}")
        if self.n < 1:
            raise ValueError(f"-n must be 1 or more, got {self.n}")
        if not self.keys or min(self.keys) < 1:
            raise ValueError(f"--keys must be 1 or more, got {', '.join(map(str, self.keys))}")
        if self.peer_writers < 1 or self.peer_keys < self.peer_writers:
            raise ValueError("the peer benchmark needs 1 or more writers and a key for each")
        if self.backlog_small_rows < self.backlog_pending:
            raise ValueError("the small backlog table must hold at least the pending events")
        if self.backlog_big_rows < self.backlog_pending:
            raise ValueError("the big backlog table must hold at least the pending events")

    @classmethod
    def quick_config(cls, **changes: Any) -> BenchConfig:
        """Tiny sizes: every benchmark in a few seconds (the smoke test)."""
        quick: dict[str, Any] = {
            "quick": True,
            "n": 200,
            "keys": (1, 100),
            "window_k_messages_per_slot": 200,
            "rates": (200,),
            "latency_seconds": 1.0,
            "latency_warmup": 0.2,
            "idle_warmup": 0.3,
            "idle_seconds": 1.5,
            "backlog_pending": 1000,
            "backlog_small_rows": 1000,
            "backlog_big_rows": 100_000,
            "writer_transactions": 200,
            "writer_block": 20,
            "fairness_backlog": 2000,
            "claim_backlog": 5000,
            "claim_keys": 1000,
            "claim_seconds": 0.5,
            "claimers": (1, 2),
            "peer_rates": (200,),
            "peer_seconds": 1.5,
            "peer_warmup": 0.3,
            "peer_backlog": 500,
        }
        quick.update(changes)
        return cls(**quick)

    def as_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["database_url"] = mask_url(self.database_url)
        values["amqp_url"] = mask_url(self.amqp_url)
        return values
