"""Logging set-up: plain text for people, or one JSON object per line for log pipelines (``log_format: json``).

A record may carry ``extra={"fields": {...}}``: in JSON those fields are the event's own keys (a pull's image,
digest, bytes, seconds, hosts, result, and for a failure its error and cause), in text they are left out (the
message says it).
"""

from __future__ import annotations

import datetime
import json
import logging

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(fmt: str, level: int) -> None:
    """Send puller's logs to stderr in ``fmt`` ("text" or "json") from ``level`` on."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
