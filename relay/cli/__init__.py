"""`outbox-relay`: run the relay, and inspect and repair the outbox.

Every subcommand is one plain function: parse the options, call `relay.admin` (or the relay),
render a table for people or JSON for scripts. Errors are turned into a message and an exit
code in one place, `OutboxGroup.invoke` (in `relay.cli.exits`).

Exit codes (documented in the README and in --help):
  0 success   1 error (unknown event, nothing confirmed, demo failed)   2 bad usage or option
  3 database unreachable   4 broker unreachable   5 outbox tables missing
  6 broker refused the relay's topology   7 another relay runs on the same SQLite database
  8 dead letters exist (status --fail-on-dead)

Modules: `root` (the `outbox-relay` group), one per command or command group (`run`,
`status`, `dead`, `maintenance` for init-db and purge, `health`, `demo`), and what they share:
`exits`, `options`, `render`, `terminal`, `database`.
"""

from __future__ import annotations

from relay.cli.root import main

__all__ = ["main"]
