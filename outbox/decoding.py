"""Decoding JSON values into the annotated fields of a dataclass (a domain event's payload).

A tolerant reader: fields the class does not declare are ignored; a missing field with a
default takes it. Each error names the field path and what was expected.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import types
import typing
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar

from outbox.errors import OutboxError

T = TypeVar("T")


class PayloadDecodeError(OutboxError, ValueError):
    """The payload does not fit the registered class (missing field, wrong type, bad JSON)."""


def decode_dataclass(cls: type[T], payload: Any, *, where: str) -> T:
    """Build `cls` from a JSON object, converting each field to its annotated type."""
    if not isinstance(payload, dict):
        raise PayloadDecodeError(f"{where}: payload is {kind_of(payload)}, not an object")
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:
        raise PayloadDecodeError(f"{where}: annotations of {cls.__name__} fail: {exc}") from exc
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not field.init:
            continue
        if field.name not in payload:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise PayloadDecodeError(
                    f"{where}: payload has no {field.name!r} (fields present: "
                    f"{', '.join(sorted(payload)) or 'none'}); add an upcaster or a default"
                )
            continue
        values[field.name] = _convert(
            payload[field.name], hints.get(field.name, Any), f"{where}.{field.name}"
        )
    try:
        return cls(**values)
    except Exception as exc:
        raise PayloadDecodeError(
            f"{where}: {cls.__name__}(...) refused the payload: {exc}"
        ) from exc


def kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _fail(where: str, value: Any, expected: str) -> PayloadDecodeError:
    return PayloadDecodeError(f"{where}: expected {expected}, got {kind_of(value)} {value!r:.80}")


def _convert(value: Any, hint: Any, where: str) -> Any:
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except PayloadDecodeError as exc:
                errors.append(str(exc))
        raise PayloadDecodeError("; ".join(errors) or f"{where}: no type matches")
    if origin is typing.Literal:
        if value in args:
            return value
        raise _fail(where, value, f"one of {args}")
    if hint is type(None):
        if value is None:
            return None
        raise _fail(where, value, "null")
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set, frozenset):
        if not isinstance(value, list):
            raise _fail(where, value, "a list")
        container = origin or hint
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise _fail(where, value, f"a list of {len(args)} items")
            return tuple(
                _convert(v, a, f"{where}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if container is list else container(items)
    if origin in (dict, Mapping) or hint in (dict, Mapping) or origin is typing.Mapping:
        if not isinstance(value, dict):
            raise _fail(where, value, "an object")
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _convert(v, value_hint, f"{where}[{k!r}]") for k, v in value.items()}
    if not isinstance(hint, type):
        return value
    if dataclasses.is_dataclass(hint):
        return decode_dataclass(hint, value, where=where)
    if issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise _fail(where, value, f"a {hint.__name__} value") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, value, "true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(where, value, "an integer")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _fail(where, value, "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise _fail(where, value, "a string")
    if hint is decimal.Decimal:
        if isinstance(value, str | int) and not isinstance(value, bool):
            try:
                return decimal.Decimal(value)
            except decimal.InvalidOperation:
                pass
        raise _fail(where, value, "a decimal number as a string")
    if hint is uuid.UUID:
        if isinstance(value, str):
            try:
                return uuid.UUID(value)
            except ValueError:
                pass
        raise _fail(where, value, "a UUID string")
    if hint is dt.datetime:
        if isinstance(value, str):
            try:
                moment = dt.datetime.fromisoformat(value)
            except ValueError:
                moment = None
            if moment is not None and moment.tzinfo is not None:
                return moment
        raise _fail(where, value, "an ISO 8601 time with a UTC offset")
    if hint is dt.date:
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                pass
        raise _fail(where, value, "an ISO 8601 date")
    if isinstance(value, hint):
        return value
    raise _fail(where, value, hint.__name__)
