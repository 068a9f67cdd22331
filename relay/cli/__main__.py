"""`python -m relay.cli`: the same as the `outbox-relay` command."""

from __future__ import annotations

from relay.cli import main

if __name__ == "__main__":
    main(prog_name="outbox-relay")
