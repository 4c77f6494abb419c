"""One log format for every Tandem service (gateway, tokenizer, engine and the engine's worker ranks).

It lives in protos/, beside the reflection helper, because the services share only this package: the format is a
contract between the services and what reads their stderr (the launcher, which prefixes each relayed line with the
service's name, and log shippers, which parse the json lines).

- text: `2026-12-05 01:25:01.123 INFO engine: message`: time, level and service on every line;
- json: one object per line with ts, level, service, logger and message (or a structured event's fields).

A structured event (the gateway's request log) passes its fields as `extra={"fields": {...}}`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
ROOT_LOGGER = "tandem"


def check_logging(level: str, log_format: str) -> None:
    """For the services' frozen configs: a bad level or format is a config error, caught once at start."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="the least severe level logged")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (for people) or json (one object per line, for log shippers)")


class _ServiceFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service


class JsonFormatter(_ServiceFormatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 6), "level": record.levelname.lower(), "service": self.service,
               "logger": record.name}
        fields = getattr(record, "fields", None)
        if fields is not None:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def text_line(service: str, level: str, message: str, created: float | None = None) -> str:
    """One text line; also what the launcher writes for itself (service `tandem`), so its lines read the same."""
    created = time.time() if created is None else created
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + f".{int(created * 1000) % 1000:03d}"
    return f"{stamp} {level} {service}: {message}"


class TextFormatter(_ServiceFormatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if fields is None:
            message = record.getMessage()
        else:
            rest = " ".join(f"{k}={v}" for k, v in fields.items() if k != "event")
            message = f"{fields.get('event', record.getMessage())} {rest}"
        line = text_line(self.service, record.levelname, message, record.created)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(service: str, level: str = "info", log_format: str = "text") -> None:
    """Sends every `tandem.*` logger of this process to stderr in the chosen format; idempotent."""
    check_logging(level, log_format)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if log_format == "json" else TextFormatter(service))
    root = logging.getLogger(ROOT_LOGGER)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
