"""Log lines an admin can follow a series by: Study/Series UID and job id on every line about one.

The stage that works on a series enters `series_context(...)`; every line any
module logs inside it (pynetdicom's and the inference package's included)
carries those identifiers, as `study_instance_uid`/`series_instance_uid`/`job_id`
fields in JSON lines or a `[study=.. series=.. job=..]` suffix in text. A
context variable rather than a LoggerAdapter, so code that never heard of
series (dispatch, inference) is covered too; each thread has its own.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

CONTEXT_FIELDS = ("study_instance_uid", "series_instance_uid", "job_id")

_context: ContextVar[dict[str, str | int]] = ContextVar("dicom_node_log_context", default={})


@contextmanager
def series_context(study_instance_uid: str | None = None, series_instance_uid: str | None = None,
                   job_id: int | None = None) -> Iterator[None]:
    """Identifiers added to every log record made inside; nested contexts add to the outer one."""
    given = dict(study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid, job_id=job_id)
    token = _context.set({**_context.get(), **{k: v for k, v in given.items() if v not in (None, "")}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the current series context onto each record (attributes named as CONTEXT_FIELDS)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _fields(record: logging.LogRecord) -> dict[str, str | int]:
    return {key: getattr(record, key) for key in CONTEXT_FIELDS if getattr(record, key, None) not in (None, "")}


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log shippers; series identifiers as their own fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage(), **_fields(record)}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class TextFormatter(logging.Formatter):
    """`time level logger: message [study=.. series=.. job=..]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if not fields:
            return text
        short = {"study_instance_uid": "study", "series_instance_uid": "series", "job_id": "job"}
        suffix = " ".join(f"{short[key]}={value}" for key, value in fields.items())
        first, newline, rest = text.partition("\n")  # a traceback stays below the tagged line
        return f"{first} [{suffix}]{newline}{rest}"


RECENT_LINES = 5000  # what GET /logs can show; a line is ~200 bytes, so about 1 MB


class RecentLines(logging.Handler):
    """The last RECENT_LINES formatted lines, for `GET /logs`: the node logs to stderr only (its
    supervisor, systemd or the container runtime, keeps the file), and an admin at the API should not
    need shell access to see why a model upload was refused. Job workers' lines come through their
    pipe (dicom_node.pipeline.workers) and are added with `add`."""

    def __init__(self, capacity: int = RECENT_LINES) -> None:
        super().__init__()
        self._lines: deque[str] = deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.add(self.format(record))
        except Exception:
            self.handleError(record)

    def add(self, line: str) -> None:
        with self._guard:
            self._lines.append(line)

    def tail(self, count: int) -> list[str]:
        """The newest `count` lines, oldest first."""
        with self._guard:
            lines = list(self._lines)
        return lines[-count:] if count > 0 else []


recent = RecentLines()


def current_format() -> str:
    """The format `configure` set up ("text" when it was not called), for worker processes to match."""
    handlers = logging.getLogger().handlers
    return "json" if handlers and isinstance(handlers[0].formatter, JsonFormatter) else "text"


def configure(log_format: str) -> None:
    """Root handler for `serve`: text or JSON lines on stderr, with the series context."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    recent.setFormatter(handler.formatter)
    recent.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler, recent]
    root.setLevel(logging.INFO)
    # openjpeg logs every encoded tile at INFO; highdicom every copied module.
    for noisy in ("pynetdicom", "apscheduler", "uvicorn", "uvicorn.access", "uvicorn.error", "highdicom",
                  "openjpeg"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
