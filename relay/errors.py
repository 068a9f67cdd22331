"""Errors raised by the relay. Driver errors are translated at the boundary (`raise ... from`)."""

from __future__ import annotations


class RelayError(Exception):
    """Base class of every error the relay raises."""


class ConfigError(RelayError, ValueError):
    """A setting is invalid: the message names it and says what to fix."""


class DatabaseUnavailableError(RelayError):
    """The database cannot be reached or the connection broke. The relay retries."""


class SchemaMissingError(RelayError):
    """The outbox tables do not exist: run `outbox-relay init-db`."""


class BrokerUnavailableError(RelayError):
    """RabbitMQ cannot be reached or the connection broke. The relay retries."""


class BrokerRefusedError(BrokerUnavailableError):
    """RabbitMQ refused the login or the virtual host at start: retrying cannot fix it."""


class BrokerConfigError(RelayError):
    """RabbitMQ refused the relay's topology (e.g. the exchange exists with another type)."""


class NotFoundError(RelayError):
    """An operator named an event that does not exist or is not in the expected state."""
