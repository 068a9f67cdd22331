"""Without OpenTelemetry nothing changes and nothing of it is imported (run in subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The relay loop (scripted publisher, SQLite store) and the consumer's processor, end to end.
_WORK = """
import json, pathlib, sys, tempfile
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker
from outbox import Event
from outbox.consumer import Handlers, Inbox, Message, Outcome, Processor
from outbox.domain import DomainEvents
from outbox.tracing import TracerSource, load_trace_api
from tests.unit.test_relay_loop import Harness

h = Harness(pathlib.Path(tempfile.mkdtemp()))
h.write(Event(type="order.placed", key="k", headers={"tenant": "acme"}))
h.settle_and_step()
(row,) = h.rows()
(published,) = h.publisher.published

inbox = Inbox(sa.MetaData())
inbox.create(h.engine)
handlers = Handlers("billing", DomainEvents(), inbox=inbox)
handled = []
handlers.on("order.placed")(lambda message, session: handled.append(message.message_id))
message = Message.from_delivery(
    message_id=published.message_id, type=published.type, headers=published.headers,
    body=published.body, routing_key=published.routing_key,
)
result = Processor(handlers, sessionmaker(h.engine)).process(message, queue="billing.0")

print(json.dumps({
    "status": row.status,
    "stored_headers": json.loads(row.headers),
    "published_headers": sorted(published.headers),
    "outcome": result.outcome.value,
    "handled": handled == [published.message_id],
    "api": load_trace_api() is not None,
    "tracer": TracerSource("outbox.relay").tracer() is not None,
    "loaded": sorted(m for m, mod in sys.modules.items()
                     if m.split(".")[0] == "opentelemetry" and mod is not None),
}))
"""


def run(prelude: str, body: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OTEL_PYTHON_TRACER_PROVIDER", None)
    completed = subprocess.run(
        [sys.executable, "-c", prelude + body],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, object] = json.loads(completed.stdout.splitlines()[-1])
    return result


def test_without_opentelemetry_installed_everything_works_and_nothing_is_imported() -> None:
    # A None entry in sys.modules makes every `import opentelemetry...` raise ImportError,
    # as if the package were not installed.
    result = run("import sys; sys.modules['opentelemetry'] = None\n", _WORK)
    assert result == {
        "status": "published",
        "stored_headers": {"tenant": "acme"},  # no trace headers
        "published_headers": [
            "aggregate-id",
            "aggregate-type",
            "event-version",
            "ordering-key",
            "outbox-seq",
            "tenant",
        ],
        "outcome": "handled",
        "handled": True,
        "api": False,
        "tracer": False,
        "loaded": [],
    }


def test_installed_but_unused_the_writer_imports_nothing_of_it() -> None:
    body = """
import json, sys
import sqlalchemy as sa
import outbox
from outbox import Event, Outbox

engine = sa.create_engine("sqlite://")
box = Outbox()
box.create(engine)
with engine.begin() as conn:
    outbox.write(conn, Event(type="order.placed"), outbox=box)
with engine.connect() as conn:
    headers = conn.execute(sa.select(box.events.c.headers)).scalar_one()
print(json.dumps({"headers": headers,
                  "loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))
"""
    assert run("", body) == {"headers": None, "loaded": []}


def test_installed_without_a_tracer_provider_the_relay_and_consumer_trace_nothing() -> None:
    # They import the API (to honour a provider configured later or by environment), and
    # start no span: the relay keeps none open and the consumer's handler sees no span.
    result = run("", _WORK)
    assert result["api"] is True
    assert result["tracer"] is False
    assert result["status"] == "published" and result["outcome"] == "handled"
    assert result["stored_headers"] == {"tenant": "acme"}
    assert "opentelemetry.sdk" not in result["loaded"]  # type: ignore[operator]
