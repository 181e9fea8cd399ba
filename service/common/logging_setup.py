"""Structured log lines: every record carries the id of the request being served (a context variable).

    ts=2025-01-01T12:00:00.123Z level=info logger=specserve.rpc request_id=3f2a... msg="rpc done" method=... code=OK

`--log-format json` writes the same fields as one JSON object per line. Extra fields are
passed as `log.info("msg", extra={"kv": {"key": value}})`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def new_request_id() -> str:
    """A fresh random request id (16 hex digits)."""
    return uuid.uuid4().hex[:16]


def _install_record_factory() -> None:
    """Stamp every LogRecord with the current request id when it is created (idempotent)."""
    old = logging.getLogRecordFactory()
    if getattr(old, "_specserve", False):
        return

    def factory(*args, **kwargs):
        record = old(*args, **kwargs)
        record.request_id = request_id_var.get()
        return record

    factory._specserve = True
    logging.setLogRecordFactory(factory)


_install_record_factory()


def _fields(record: logging.LogRecord) -> dict:
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
    out = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
           "request_id": getattr(record, "request_id", "-"), "msg": record.getMessage()}
    out.update(getattr(record, "kv", None) or {})
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


def _logfmt_value(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list, tuple, bool)) or v is None else str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        return json.dumps(s)
    return s


class LogfmtFormatter(logging.Formatter):
    """key=value pairs on one line (tracebacks quoted into `exc`)."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


def configure(level: str = "info", fmt: str = "text", stream=None) -> None:
    """Route the root logger to `stream` (stderr) with structured lines; idempotent."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_specserve", False):
            root.removeHandler(h)
    handler._specserve = True
    root.addHandler(handler)
    root.setLevel(level.upper())
