"""Secrets of the tool configuration never leave the runner: URL user info and query strings, header
values and tokens given for a tool are replaced by ``***`` in labels, errors, logs, results and records,
so neither the model (the KV cache), the user's output nor a log ever holds them.

``redact_url`` hides the parts of a URL that carry credentials; ``Redactor`` scrubs every text the runner
lets out, from the secrets it was given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from timjax.tools.encoding import encode_error

__all__ = ["MASK", "MIN_SECRET_CHARS", "Redactor", "redact_url", "scrubbed_logs", "url_secrets"]

MASK = "***"
MIN_SECRET_CHARS = 4  # shorter "secrets" would mask ordinary text (a password "a" would eat every a)


def redact_url(url: str) -> str:
    """``url`` without credentials: user info becomes ``***@``, the query ``?***``, the fragment goes."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, MASK if parts.query else "", ""))


def url_secrets(url: str) -> list[str]:
    """The credential parts of a URL: user, password, the query string and each of its values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    out = [parts.username or "", parts.password or "", parts.query, parts.fragment]
    out += [v for _, v in parse_qsl(parts.query, keep_blank_values=True)]
    if "@" in parts.netloc:
        out.append(parts.netloc.rsplit("@", 1)[0])
    return [s for s in out if s]


def header_secrets(headers: Mapping[str, str] | None) -> list[str]:
    """Every header value, and its last word (``Bearer <token>`` -> the token too)."""
    out = []
    for v in (headers or {}).values():
        v = str(v)
        out += [v, v.split()[-1] if v.split() else v]
    return out


class Redactor:
    """Replaces known secrets (and their URL-quoted and JSON-escaped forms) by ``***``."""

    def __init__(self, secrets: Iterable[str] = ()):
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        forms = set(self._secrets)
        for s in secrets:
            if not s or len(s) < MIN_SECRET_CHARS:
                continue
            forms.update({s, unquote(s), quote(s, safe=""), json.dumps(s, ensure_ascii=False)[1:-1]})
        # longest first: a secret that contains another is masked whole
        self._secrets = sorted((f for f in forms if len(f) >= MIN_SECRET_CHARS), key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def text(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, MASK)
        return text

    def encoded(self, encoded: str) -> str:
        """An encoded tool result with the secrets masked; if masking broke its JSON (a secret that was a
        number or JSON syntax), the result is withheld as an error object instead."""
        out = self.text(encoded)
        if out == encoded:
            return encoded
        try:
            json.loads(out)
        except ValueError:
            return encode_error("result withheld: it contained a secret of the tool configuration")
        return out


# -- logs: the MCP SDK and httpx log request URLs (credentials and query included) at INFO/DEBUG ------------
_ACTIVE: list[Redactor] = []
_LOCK = threading.Lock()
_BASE_FACTORY = None


def _scrubbing_factory(*args, **kwargs):
    record = _BASE_FACTORY(*args, **kwargs)
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is the logging module's business
        return record
    clean = message
    for r in list(_ACTIVE):
        clean = r.text(clean)
    if clean != message:
        record.msg, record.args = clean, ()
    return record


@contextlib.contextmanager
def scrubbed_logs(redactor: Redactor):
    """While open, every log record of the process has ``redactor``'s secrets masked (a record factory:
    logger filters would miss the SDK's child loggers, handler filters the handlers added later)."""
    global _BASE_FACTORY
    if not redactor:
        yield
        return
    with _LOCK:
        if not _ACTIVE:
            _BASE_FACTORY = logging.getLogRecordFactory()
            logging.setLogRecordFactory(_scrubbing_factory)
        _ACTIVE.append(redactor)
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE.remove(redactor)
            if not _ACTIVE and logging.getLogRecordFactory() is _scrubbing_factory:
                logging.setLogRecordFactory(_BASE_FACTORY)
