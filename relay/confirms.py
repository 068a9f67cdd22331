"""The publisher's window of messages waiting for their confirm, by delivery tag.

On a confirm-mode channel the broker numbers published messages 1, 2, 3, ... and acks or
nacks them by that delivery tag, singly or "this one and all before it" (multiple). The
window maps delivery tags back to the relay's own tag and message_id. Not thread-safe: the
publisher holds its lock around every call.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

# (relay tag, message_id) of one message waiting for its confirm.
Entry = tuple[int, str]


class ConfirmWindow:
    def __init__(self) -> None:
        # None once settled out of order (a single ack in the middle of the window), so that
        # the deque stays indexable by `delivery_tag - first_tag`.
        self._pending: collections.deque[Entry | None] = collections.deque()
        self._first_tag = 1  # delivery tag of _pending[0]
        self._count = 0

    def __len__(self) -> int:
        """Messages published and not yet settled."""
        return self._count

    def published(self, entries: Iterable[Entry]) -> None:
        """Messages just published, in the order the broker received them."""
        before = len(self._pending)
        self._pending.extend(entries)
        self._count += len(self._pending) - before

    def settle(self, delivery_tag: int, multiple: bool) -> list[Entry]:
        """The messages an ack or nack settles (none that were settled already)."""
        pending = self._pending
        settled: list[Entry] = []
        if multiple:
            # delivery_tag 0 with multiple means "everything outstanding" (AMQP 0-9-1).
            count = len(pending) if delivery_tag == 0 else delivery_tag - self._first_tag + 1
            count = max(0, min(count, len(pending)))
            for _ in range(count):
                entry = pending.popleft()
                if entry is not None:
                    settled.append(entry)
            self._first_tag += count
        else:
            index = delivery_tag - self._first_tag
            if 0 <= index < len(pending):
                entry = pending[index]
                if entry is not None:
                    settled.append(entry)
                    pending[index] = None
        while pending and pending[0] is None:
            pending.popleft()
            self._first_tag += 1
        self._count -= len(settled)
        return settled

    def take_all(self) -> list[Entry]:
        """Every unsettled message (the channel is gone: the caller settles them)."""
        entries = [entry for entry in self._pending if entry is not None]
        self._first_tag += len(self._pending)
        self._pending.clear()
        self._count = 0
        return entries

    def new_channel(self) -> list[Entry]:
        """A new channel numbers from 1 again; returns leftovers of the old one (normally
        none: a closing channel settles its messages)."""
        leftovers = self.take_all()
        self._first_tag = 1
        return leftovers
