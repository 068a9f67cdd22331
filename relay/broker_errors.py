"""What pika's connection errors mean: the cause in one line, and which ones are permanent.

pika wraps a failed connect three or four deep (`AMQPConnectionError` around a workflow failure
around a phase error around the `OSError`), and logs every layer at ERROR on its way out. The
publisher reports each failed attempt itself, once, with the innermost cause; `quiet_pika()`
turns pika's own lines for the same failure into DEBUG records.
"""

from __future__ import annotations

import logging

import pika.exceptions

from relay.urls import mask_text

# Loggers with which pika narrates a connection attempt that failed (each layer once).
_CONNECT_LOGGERS = (
    "pika.adapters.utils.connection_workflow",
    "pika.adapters.utils.io_services_utils",
    "pika.adapters.utils.selector_ioloop_adapter",
    "pika.adapters.base_connection",
    "pika.connection",
)


def root_cause(error: BaseException) -> BaseException:
    """The innermost error of pika's connection-workflow wrappers."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "exceptions", None)  # AMQPConnectionWorkflowFailed
        if isinstance(inner, tuple) and inner and isinstance(inner[-1], BaseException):
            error = inner[-1]
            continue
        phase = getattr(error, "exception", None)  # AMQPConnectorPhaseErrorBase
        if isinstance(phase, BaseException):
            error = phase
            continue
        if (
            isinstance(error, pika.exceptions.AMQPConnectionError)
            and not isinstance(error, pika.exceptions.ConnectionClosed)
            and error.args
            and isinstance(error.args[0], BaseException)
        ):
            error = error.args[0]
            continue
        break
    return error


def describe_error(error: BaseException | str | None) -> str:
    """A one-line, password-free description of a pika error for statuses and logs."""
    if error is None:
        return "unknown error"
    if isinstance(error, str):
        return mask_text(error)
    error = root_cause(error)
    if isinstance(error, pika.exceptions.ChannelClosed | pika.exceptions.ConnectionClosed):
        text = f"{type(error).__name__}: {error.reply_code} {error.reply_text}"
    elif isinstance(error, OSError) and error.strerror:
        text = f"{type(error).__name__}: {error.strerror}"
    else:
        detail = " ".join(str(a) for a in error.args) if error.args else str(error)
        text = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    return mask_text(text)


def refusal(error: BaseException | str) -> str | None:
    """What to fix, when the broker refused the login or the virtual host (None otherwise).

    Retrying cannot fix either at start: the same user, password and vhost will be refused
    again, so the relay stops with exit code 4 instead of retrying forever.
    """
    if isinstance(error, str):
        return None
    error = root_cause(error)
    detail = " ".join(str(a) for a in error.args).strip() if error.args else ""
    # pika calls any connection that ends during the login or vhost phase "probable": a node
    # shutting down (320), a vhost being recovered ("is down"), a connection limit, or a reset
    # look the same. Only the broker's explicit answer is a refusal.
    upper = detail.upper()
    if isinstance(error, pika.exceptions.AuthenticationError) or (
        isinstance(error, pika.exceptions.ProbableAuthenticationError) and "ACCESS_REFUSED" in upper
    ):
        return mask_text(
            f"the broker refused the login ({detail or type(error).__name__}): check the user "
            "name and password in the AMQP URL"
        )
    vhost_refused = (
        "NOT_FOUND" in upper or "NOT FOUND" in upper or "REFUSED FOR USER" in upper
    ) and "CONNECTION LIMIT" not in upper
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError) and vhost_refused:
        return mask_text(
            f"the broker refused the virtual host ({detail or type(error).__name__}): check the "
            "vhost in the AMQP URL (the path, %2F for the default /), or create it and grant "
            "the user access (rabbitmqctl add_vhost / set_permissions)"
        )
    return None


class _DemoteToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_DEMOTE = _DemoteToDebug()


def quiet_pika() -> None:
    """Demote pika's own lines about connection attempts to DEBUG (idempotent): the publisher
    logs one WARNING per failed attempt with the cause, which is all an operator needs."""
    for name in _CONNECT_LOGGERS:
        logger = logging.getLogger(name)
        if _DEMOTE not in logger.filters:
            logger.addFilter(_DEMOTE)
