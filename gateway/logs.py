"""Gateway logging to stderr: `json` (one object per line, for log shippers) or `text` (for people)."""
from __future__ import annotations

import json
import logging
import sys

LOG_FORMATS = ("json", "text")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        if fields is not None:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if fields is None:
            return f"[gateway] {record.levelname.lower()} {record.getMessage()}"
        rest = " ".join(f"{k}={v}" for k, v in fields.items() if k != "event")
        return f"[gateway] {fields.get('event', record.getMessage())} {rest}"


def setup_logging(log_format: str) -> None:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger("tandem")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
