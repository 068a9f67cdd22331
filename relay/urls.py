"""Connection URLs as they may appear in logs and errors: never with a password."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_PASSWORD_IN_TEXT = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@", re.I
)


def mask_url(url: str) -> str:
    """`amqp://guest:secret@host/` -> `amqp://guest:***@host/`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return mask_text(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def mask_text(text: str) -> str:
    """Mask every URL password inside free text (driver error messages quote URLs)."""
    return _PASSWORD_IN_TEXT.sub(r"\g<scheme>\g<user>:***@", text)
