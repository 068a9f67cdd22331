"""The README's "Consuming events" example runs as written: the module, the relay, the consumer."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import psycopg
import pytest
import sqlalchemy as sa

from relay.consumer.topology import Topology
from tests.consumer.broker import cleaned_up
from tests.consumer.processes import wait_for
from tests.support.rabbit import unique_name

REPO = Path(__file__).resolve().parents[2]
README_URL = "postgresql+psycopg://app@localhost/app"
PG_ADMIN_DSN = "host=127.0.0.1 user=root dbname=postgres"

pytestmark = pytest.mark.slow


def consuming_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Consuming events\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert blocks, "no Python block under 'Consuming events'"
    return str(blocks[0])


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    name = f"readme_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://root@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def queue_exists(amqp_url: str, queue: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        connection.close()


def test_the_consuming_example_runs_as_written(amqp_url: str, tmp_path: Path) -> None:
    group, exchange = unique_name("stock"), unique_name("ex")
    code = consuming_block()
    assert README_URL in code and 'Handlers("stock"' in code
    topology = Topology(group=group, exchange=exchange, routing_keys=("order.placed",), queues=2)
    with fresh_database() as url, cleaned_up(amqp_url, topology):
        package = tmp_path / "myapp"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "handlers.py").write_text(
            code.replace(README_URL, url).replace('Handlers("stock"', f'Handlers("{group}"')
        )
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
        cli = [sys.executable, "-m", "relay.cli"]
        broker = ["--database-url", url, "--amqp-url", amqp_url, "--exchange", exchange]
        run = subprocess.run(
            [sys.executable, "myapp/handlers.py"], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        log = (tmp_path / "consumer.log").open("w")
        consumer = subprocess.Popen(
            [*cli, "consume", "myapp.handlers:handlers", "--queues", "2", *broker],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            output = (tmp_path / "consumer.log").read_text
            wait_for(lambda: queue_exists(amqp_url, f"{group}.1"), "topology", logs=output)
            relay = subprocess.run(
                [*cli, "run", "--until-empty", *broker], cwd=tmp_path, env=env,
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert relay.returncode == 0, relay.stderr
            engine = sa.create_engine(url)
            try:

                def reserved() -> list[tuple[int, str]]:
                    with engine.connect() as conn:
                        rows = conn.execute(sa.text("SELECT order_id, total FROM reservations"))
                        return [(r[0], str(r[1])) for r in rows]

                wait_for(lambda: reserved() == [(1, "9.99")], "the handler's effect", logs=output)
            finally:
                engine.dispose()
            consumer.send_signal(signal.SIGTERM)
            assert consumer.wait(30) == 0, output()
        finally:
            if consumer.poll() is None:
                consumer.kill()
                consumer.wait()
            log.close()
