"""The outbox's DDL beyond its tables: the triggers, the upgrade from older versions, and the
check that a database holds a complete outbox of this version.

Why the triggers (PostgreSQL):
- **Numbering in commit order per key.** A sequence hands out numbers at insert, not at commit.
  If T1 inserted row 1 of key K and committed after T2 inserted and committed row 2 of K, a
  relay would see row 2 first and publish it before row 1. The row trigger takes a
  transaction-scoped advisory lock on the key before it numbers the row, so writers of one
  key number their rows in commit order and the committed rows of a key are always a gap-free
  prefix of its order. The sequence must not be cached (`CACHE 1`): with a cache each session
  numbers from its own block, and lock-then-number no longer orders anything.
- **Tracking keys.** Under the same lock the trigger makes sure the key has a row in
  `<table>_key`. A relay removes a drained key's row only while holding that lock too (see
  `relay.store`), so a key row can never disappear under a writer that is about to commit a
  pending row of the key: every pending row's key has a row, and relays find all work by
  claiming key rows. Under READ COMMITTED the trigger first looks for the row (each statement
  of a PL/pgSQL function sees what committed before it, here after the lock), so a writer never
  waits for a relay that is updating the key's row. Under REPEATABLE READ or SERIALIZABLE the
  snapshot may be older than the lock, so the look could see a row removed since: the trigger
  always inserts with ON CONFLICT DO NOTHING instead, which checks the latest committed row.
  That insert raises a serialization failure when the row it conflicts with committed after the
  snapshot (a relay updated it, another writer created it); the row then exists and, as this
  writer holds the key's lock, stays: the trigger catches the error and goes on. Such a writer
  can still wait (milliseconds) while a relay's transaction is updating the key's row.
- **Waking relays.** A statement trigger sends NOTIFY, delivered at commit.

SQLite has one writer at a time, so it needs neither lock nor ordering trigger, only the
key-tracking trigger.
"""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.schema import CreateIndex, CreateTable, DDLElement, DropTable

from outbox.schema import DEAD, NEVER_SERVED, PENDING, Outbox


@dataclasses.dataclass(frozen=True)
class SchemaReport:
    """What `Outbox.create()` changed, one line each for people."""

    changes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SchemaCheck:
    """Whether a database holds a complete outbox of this version.

    `errors`: the relay must not run (each says how to fix it). `warnings`: it may, but
    something is off."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    tables_missing: bool = False  # not even the events table: nothing to upgrade

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclasses.dataclass(frozen=True)
class _Names:
    """Every name the DDL uses, quoted for the dialect."""

    events: str  # qualified, quoted: "Sales"."Events"
    keys: str
    relays: str
    events_literal: str  # the same as an SQL string literal
    number_fn: str
    number_trigger: str
    notify_fn: str
    notify_trigger: str
    old_trigger: str
    old_fn: str
    old_pending_index: str
    track_trigger: str
    constraint: str
    constraint_literal: str
    channel_literal: str

    @classmethod
    def of(cls, outbox: Outbox, dialect: Dialect) -> _Names:
        prep = dialect.identifier_preparer
        prefix = f"{prep.quote_identifier(outbox.schema)}." if outbox.schema else ""

        def qualified(name: str) -> str:
            return prefix + prep.quote_identifier(name)

        events = qualified(outbox.name)
        return cls(
            events=events,
            keys=qualified(outbox.keys.name),
            relays=qualified(outbox.relays.name),
            events_literal=_literal(events),
            number_fn=qualified(f"{outbox.name}_number_by_key"),
            number_trigger=prep.quote_identifier(f"{outbox.name}_number_by_key"),
            notify_fn=qualified(f"{outbox.name}_notify"),
            notify_trigger=prep.quote_identifier(f"{outbox.name}_notify"),
            old_trigger=prep.quote_identifier(f"{outbox.name}_order_by_key"),
            old_fn=qualified(f"{outbox.name}_order_by_key"),
            old_pending_index=qualified(f"{outbox.name}_pending_idx"),
            track_trigger=prep.quote_identifier(f"{outbox.name}_track_key"),
            constraint=prep.quote_identifier(f"{outbox.name}_lease_v2"),
            constraint_literal=_literal(f"{outbox.name}_lease_v2"),
            channel_literal=_literal(outbox.channel),
        )


# New keys take their turn first, whatever the clocks of the relays say (see outbox.schema).
_NEVER_PG = "'1970-01-01 00:00:00+00'::timestamptz"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# -- the statements --------------------------------------------------------------------------


def ddl_statements(outbox: Outbox, dialect: Dialect) -> list[str]:
    """Idempotent DDL: creates what is missing and, on PostgreSQL, upgrades a schema-1 outbox."""
    elements: list[DDLElement] = []
    if dialect.name == "postgresql" and outbox.schema:
        elements.append(sa.schema.CreateSchema(outbox.schema, if_not_exists=True))
    for table in outbox.tables:
        elements.append(CreateTable(table, if_not_exists=True))
    for table in outbox.tables:
        # Sorted: table.indexes is a set, and the DDL text should not change between runs.
        # Indexes separately from their tables: an upgraded table gets the new ones too.
        indexes = sorted(table.indexes, key=lambda index: str(index.name))
        elements.extend(CreateIndex(index, if_not_exists=True) for index in indexes)
    statements = [str(element.compile(dialect=dialect)).strip() for element in elements]
    names = _Names.of(outbox, dialect)
    if dialect.name == "postgresql":
        return [*statements, *_postgres_statements(outbox, names), _adopt_keys(names, dialect)]
    if dialect.name == "sqlite":
        return [*statements, _sqlite_track_trigger(names), _adopt_keys(names, dialect)]
    return statements


def drop_statements(outbox: Outbox, dialect: Dialect) -> list[str]:
    """Idempotent DDL that removes the outbox: its tables, which take their triggers, indexes
    and sequences with them, then (PostgreSQL) the trigger functions, schema 1's included.
    The schema stays: `ddl_statements()` creates it only if missing, so it may not be ours."""
    tables = [
        str(DropTable(table, if_exists=True).compile(dialect=dialect)).strip()
        for table in reversed(outbox.tables)
    ]
    if dialect.name != "postgresql":
        return tables
    n = _Names.of(outbox, dialect)
    return [
        *tables,
        *(f"DROP FUNCTION IF EXISTS {fn}()" for fn in (n.number_fn, n.notify_fn, n.old_fn)),
    ]


def _adopt_keys(n: _Names, dialect: Dialect) -> str:
    """Give every key with pending events its row: events written while the triggers were
    missing (tables made by `create_all`) would otherwise never be claimed."""
    if dialect.name == "postgresql":
        return (
            f"INSERT INTO {n.keys} (key, available_at) SELECT DISTINCT key, {_NEVER_PG} "
            f"FROM {n.events} WHERE status = '{PENDING}' AND key IS NOT NULL "
            "ON CONFLICT (key) DO NOTHING"
        )
    never = NEVER_SERVED.strftime("%Y-%m-%d %H:%M:%S.%f")
    return (
        f"INSERT OR IGNORE INTO {n.keys} (key, available_at, held) SELECT DISTINCT key, "
        f"'{never}', 0 FROM {n.events} WHERE status = '{PENDING}' AND key IS NOT NULL"
    )


def _postgres_statements(outbox: Outbox, n: _Names) -> list[str]:
    upgrade = f"""DO $do$
DECLARE
    changed bigint;
BEGIN
    -- An outbox of schema 1 has no such constraint: its relays leased rows one by one.
    IF EXISTS (SELECT 1 FROM pg_constraint
               WHERE conrelid = {n.events_literal}::regclass
                 AND conname = {n.constraint_literal}) THEN
        RETURN;
    END IF;
    -- Writers and old relays wait while the keys are taken over (reads go on).
    LOCK TABLE {n.events} IN SHARE ROW EXCLUSIVE MODE;
    -- Every key with pending or dead events gets its row: still leased until its old lease
    -- runs out, waiting until its head's retry time, held if it has a dead event (a schema-1
    -- relay held such keys by default).
    INSERT INTO {n.keys} (key, available_at, held)
    SELECT key,
           GREATEST({_NEVER_PG}, max(lease_until) FILTER (WHERE status = '{PENDING}'),
                    max(next_attempt_at) FILTER (WHERE status = '{PENDING}')),
           bool_or(status = '{DEAD}')
    FROM {n.events}
    WHERE key IS NOT NULL AND status IN ('{PENDING}', '{DEAD}')
    GROUP BY key
    ON CONFLICT (key) DO NOTHING;
    GET DIAGNOSTICS changed = ROW_COUNT;
    RAISE NOTICE USING MESSAGE = 'outbox upgrade: ' || changed
        || ' keys with pending or dead events now tracked in ' || {_literal(n.keys)};
    UPDATE {n.events} SET claim_token = NULL, lease_until = NULL
    WHERE key IS NOT NULL AND claim_token IS NOT NULL;
    GET DIAGNOSTICS changed = ROW_COUNT;
    RAISE NOTICE USING MESSAGE = 'outbox upgrade: ' || changed || ' row leases moved to keys';
    -- From now on an old relay that leases a keyed row fails on this constraint.
    ALTER TABLE {n.events} ADD CONSTRAINT {n.constraint}
        CHECK (key IS NULL OR claim_token IS NULL) NOT VALID;
END
$do$"""
    # No format() and no '%' anywhere: the text must pass through any driver unchanged.
    number = f"""DO $do$
DECLARE
    events regclass := {n.events_literal}::regclass;
    -- Qualified text: a regclass prints without its schema when that is on the search path,
    -- and the function runs with its own search path.
    seq text := pg_get_serial_sequence({n.events_literal}, 'seq');
    keys text := (SELECT quote_ident(ns.nspname) || '.' || quote_ident({_literal(outbox.keys.name)})
                  FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
                  WHERE c.oid = events);
BEGIN
    -- A cached sequence numbers from per-session blocks: commit order would be lost.
    EXECUTE 'ALTER SEQUENCE ' || seq || ' CACHE 1';
    EXECUTE replace(replace($body$
CREATE OR REPLACE FUNCTION {n.number_fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NEW.key IS NOT NULL THEN
        -- Writers of one key queue here, so they number their rows in commit order.
        PERFORM pg_advisory_xact_lock(hashtextextended(NEW.key, {outbox.key_lock_seed}));
        NEW.seq := nextval(@SEQ@::regclass);
        IF current_setting('transaction_isolation') = 'read committed' THEN
            PERFORM 1 FROM @KEYS@ WHERE key = NEW.key;
            IF NOT FOUND THEN
                INSERT INTO @KEYS@ (key, available_at) VALUES (NEW.key, {_NEVER_PG})
                ON CONFLICT (key) DO NOTHING;
            END IF;
        ELSE
            BEGIN
                INSERT INTO @KEYS@ (key, available_at) VALUES (NEW.key, {_NEVER_PG})
                ON CONFLICT (key) DO NOTHING;
            EXCEPTION WHEN serialization_failure THEN
                -- The key's row exists, committed after this transaction's snapshot. Only a
                -- holder of this key's lock may remove it, and this transaction holds it.
                NULL;
            END;
        END IF;
    END IF;
    RETURN NEW;
END
$fn$
$body$, '@SEQ@', quote_literal(seq)), '@KEYS@', keys);
END
$do$"""
    notify_fn = f"""CREATE OR REPLACE FUNCTION {n.notify_fn}() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- Delivered at commit, and only if the transaction commits: relays wake at once.
    PERFORM pg_notify({n.channel_literal}, '');
    RETURN NULL;
END
$fn$"""
    return [
        upgrade,
        # Added after schema 2 was first released: which broker node each relay is on.
        f"ALTER TABLE {n.relays} ADD COLUMN IF NOT EXISTS broker_node text",
        # Schema 1's index of pending rows by seq alone: a claim must never walk it.
        f"DROP INDEX IF EXISTS {n.old_pending_index}",
        number,
        f"DROP TRIGGER IF EXISTS {n.old_trigger} ON {n.events}",
        f"DROP FUNCTION IF EXISTS {n.old_fn}()",
        f"DROP TRIGGER IF EXISTS {n.number_trigger} ON {n.events}",
        f"CREATE TRIGGER {n.number_trigger} BEFORE INSERT ON {n.events} "
        f"FOR EACH ROW EXECUTE FUNCTION {n.number_fn}()",
        notify_fn,
        f"DROP TRIGGER IF EXISTS {n.notify_trigger} ON {n.events}",
        f"CREATE TRIGGER {n.notify_trigger} AFTER INSERT ON {n.events} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {n.notify_fn}()",
    ]


def _sqlite_track_trigger(n: _Names) -> str:
    never = NEVER_SERVED.strftime("%Y-%m-%d %H:%M:%S.%f")
    return (
        f"CREATE TRIGGER IF NOT EXISTS {n.track_trigger} AFTER INSERT ON {n.events} "
        f"WHEN NEW.key IS NOT NULL BEGIN "
        f"INSERT OR IGNORE INTO {n.keys} (key, available_at, held) "
        f"VALUES (NEW.key, '{never}', 0); END"
    )


# -- create and upgrade ----------------------------------------------------------------------


def create(outbox: Outbox, conn: Connection) -> SchemaReport:
    """Run the DDL on `conn` (inside the caller's transaction); report what it changed."""
    inspector = sa.inspect(conn)
    existed = {t.name for t in outbox.tables if inspector.has_table(t.name, schema=outbox.schema)}
    before = check(outbox, conn) if outbox.events.name in existed else None
    upgrading = outbox.events.name in existed and outbox.keys.name not in existed
    if conn.dialect.name == "sqlite" and outbox.relays.name in existed:
        columns = {c["name"] for c in inspector.get_columns(outbox.relays.name)}
        if "broker_node" not in columns:  # SQLite has no ADD COLUMN IF NOT EXISTS
            names = _Names.of(outbox, conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {names.relays} ADD COLUMN broker_node TEXT")
    sqlite_upgrade = upgrading and conn.dialect.name == "sqlite"
    adopt = _adopt_keys(_Names.of(outbox, conn.dialect), conn.dialect)
    for statement in ddl_statements(outbox, conn.dialect):
        if sqlite_upgrade and statement == adopt:
            # Before the generic adoption of pending keys, which would take their place
            # without their holds and retry times.
            _sqlite_upgrade(outbox, conn)
        conn.exec_driver_sql(statement)
    changes: list[str] = []
    created = [t.name for t in outbox.tables if t.name not in existed]
    if created:
        changes.append("created tables " + ", ".join(created))
    if upgrading:
        keys = conn.execute(sa.select(sa.func.count()).select_from(outbox.keys)).scalar_one()
        held = conn.execute(
            sa.select(sa.func.count()).select_from(outbox.keys).where(outbox.keys.c.held)
        ).scalar_one()
        refused = (
            "relays of earlier versions are refused from now on"
            if conn.dialect.name == "postgresql"
            else "stop every relay of an earlier version: SQLite cannot refuse them"
        )
        changes.append(
            f"upgraded {outbox.qualified_name} from schema 1: {keys} keys with pending or dead "
            f"events tracked, {held} of them held by a dead letter (requeue or purge them to "
            f"release them); {refused}"
        )
    if before is not None:
        changes.extend(f"fixed: {problem}" for problem in before.errors if not upgrading)
        changes.extend(f"fixed: {warning}" for warning in before.warnings)
    if not changes:
        changes.append("nothing to do: the outbox is complete")
    return SchemaReport(changes=tuple(changes))


def _sqlite_upgrade(outbox: Outbox, conn: Connection) -> None:
    t, k = outbox.events, outbox.keys
    never = sa.literal(NEVER_SERVED, sa.DateTime(timezone=True))
    rows = (
        sa.select(
            t.c.key,
            sa.func.coalesce(sa.func.max(t.c.next_attempt_at).filter(t.c.status == PENDING), never),
            sa.func.max(sa.case((t.c.status == DEAD, 1), else_=0)),
        )
        .where(t.c.key.is_not(None), t.c.status.in_([PENDING, DEAD]))
        .group_by(t.c.key)
    )
    conn.execute(
        sa.insert(k).from_select(["key", "available_at", "held"], rows).prefix_with("OR IGNORE")
    )
    conn.execute(
        sa.update(t)
        .where(t.c.key.is_not(None), t.c.claim_token.is_not(None))
        .values(claim_token=None, lease_until=None)
    )


# -- the check -------------------------------------------------------------------------------


def check(outbox: Outbox, conn: Connection) -> SchemaCheck:
    """What is missing from the outbox in this database, and what is off."""
    inspector = sa.inspect(conn)
    fix = "run `outbox-relay init-db` (or apply `outbox-relay init-db --sql`)"
    if not inspector.has_table(outbox.events.name, schema=outbox.schema):
        return SchemaCheck(
            errors=(f"the outbox table {outbox.qualified_name} is missing: {fix}",),
            warnings=(),
            tables_missing=True,
        )
    errors: list[str] = []
    warnings: list[str] = []
    if not inspector.has_table(outbox.keys.name, schema=outbox.schema):
        errors.append(
            f"the outbox {outbox.qualified_name} was made by an earlier version (schema 1, no "
            f"{outbox.keys.name} table): {fix} to upgrade it in place"
        )
    triggers = _trigger_names(outbox, conn)
    if conn.dialect.name == "postgresql":
        expected = {
            f"{outbox.name}_number_by_key": "numbers rows per key in commit order",
            f"{outbox.name}_notify": "wakes relays at commit",
        }
        for name, why in expected.items():
            if name not in triggers:
                errors.append(
                    f"the outbox table {outbox.qualified_name} has no trigger {name} (it "
                    f"{why}; tables made by metadata.create_all or a migration lack it): {fix}"
                )
        cache = _sequence_cache(outbox, conn)
        if cache is not None and cache != 1:
            warnings.append(
                f"the sequence of {outbox.qualified_name}.seq caches {cache} numbers per "
                f"session, which breaks per-key order under late commits: {fix}, or ALTER "
                "SEQUENCE ... CACHE 1"
            )
    elif conn.dialect.name == "sqlite" and f"{outbox.name}_track_key" not in triggers:
        errors.append(
            f"the outbox table {outbox.qualified_name} has no trigger {outbox.name}_track_key "
            f"(tables made by metadata.create_all lack it): {fix}"
        )
    return SchemaCheck(errors=tuple(errors), warnings=tuple(warnings))


def _trigger_names(outbox: Outbox, conn: Connection) -> set[str]:
    if conn.dialect.name == "postgresql":
        rows = conn.execute(
            sa.text(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = CAST(:table AS regclass) "
                "AND NOT tgisinternal"
            ),
            {"table": _Names.of(outbox, conn.dialect).events},
        )
        return {row[0] for row in rows}
    if conn.dialect.name == "sqlite":
        rows = conn.execute(
            sa.text("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :t"),
            {"t": outbox.name},
        )
        return {row[0] for row in rows}
    return set()


def _sequence_cache(outbox: Outbox, conn: Connection) -> int | None:
    value = conn.execute(
        sa.text(
            "SELECT s.seqcache FROM pg_sequence s "
            "WHERE s.seqrelid = CAST(pg_get_serial_sequence(:table, 'seq') AS regclass)"
        ),
        {"table": _Names.of(outbox, conn.dialect).events},
    ).scalar()
    return int(value) if value is not None else None
