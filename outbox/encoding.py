"""JSON encoding of event payloads and headers.

Payloads are encoded once, at write time, and stored as text: the relay publishes those
exact bytes, so consumers see what the application wrote and the relay never re-encodes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import uuid
from collections.abc import Mapping
from typing import Any

from outbox.errors import PayloadNotSerializableError


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise PayloadNotSerializableError(
                f"naive datetime {value!r} in payload: make it timezone-aware "
                "(e.g. datetime.now(UTC)) so consumers know which instant it is"
            )
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        # A string keeps every digit; a float would round money.
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_json(value: Any, *, what: str) -> str:
    """Encode `value` as compact JSON, or raise an error that names `what` and the culprit."""
    try:
        return json.dumps(
            value, default=_default, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except PayloadNotSerializableError as exc:
        raise PayloadNotSerializableError(f"{what}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise PayloadNotSerializableError(
            f"{what} cannot be encoded as JSON ({exc}); use dicts, lists, str, int, float, "
            "bool, None, dataclasses, datetime, Decimal or UUID"
        ) from exc


def encode_headers(headers: Mapping[str, str]) -> str | None:
    return encode_json(dict(headers), what="event headers") if headers else None
