"""JSON logs: one object per line on stderr, so a log shipper needs no parsing rules.

Fields passed as ``extra=`` become top-level keys. uvicorn's own loggers are routed through the
same formatter and its access log is switched off: the request middleware writes one richer line
per request instead (and none for probes and scrapes).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import pydantic_core

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", **extra}``; exceptions as one ``exc_info`` string."""

    _second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._static = static or {}  # on every line: the worker process's index

    def _ts(self, created: float) -> str:
        """``isoformat(timespec="milliseconds")`` with the date and time part formatted once a
        second: an access line per request made that call a fifth of the formatting cost."""
        second = int(created)
        micros = round((created - second) * 1_000_000)  # fromtimestamp rounds to the microsecond
        if micros == 1_000_000:
            second, micros = second + 1, 0
        cached, text = self._second
        if second != cached:
            text = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, text)  # one assignment: safe when threads log at once
        return f"{text}.{micros // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": self._ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **self._static,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        # pydantic-core's serializer, cheaper than json's encoder on a line written per request;
        # anything it cannot encode is written as its str()
        line: str = pydantic_core.to_json(payload, fallback=str).decode()
        return line


def configure_logging(level: str = "info", *, worker: int | None = None) -> None:
    """Send the root logger and uvicorn's loggers to stderr as JSON (called by the CLI only);
    each line names the ``worker`` process that wrote it, when there are several."""
    # Facts every record would otherwise collect (thread and process names, the caller's file and
    # line by walking the stack) that the JSON line never shows, paid on every access line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the documented way to skip findCaller
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(None if worker is None else {"worker": worker}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # onnxruntime reports a missing CUDA provider as a Python warning
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True
