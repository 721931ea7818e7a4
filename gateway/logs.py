"""Structured logs: one JSON object a line. Log IDs, counts and reasons only, never sample values. And
`exit_now`, the end of a process whose last log line is written."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import NoReturn


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...fields}`, where fields come from `extra={"fields": {...}}`,
    after `stamp` (fields every line of this process carries, such as the serving process's number)."""

    def __init__(self, stamp: dict | None = None):
        super().__init__()
        self.stamp = dict(stamp or {})

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.stamp,
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), default=str)


def configure_logging(level: int = logging.INFO, stamp: dict | None = None) -> None:
    """JSON lines on stderr for the `bandgate` loggers (idempotent), each carrying `stamp`'s fields."""
    logger = logging.getLogger("bandgate")
    if any(getattr(h, "_bandgate", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(stamp))
    handler._bandgate = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def exit_now(code: int) -> NoReturn:
    """End a serving or worker process that has stopped: flush the logs and stdio, then `os._exit`.

    By then its stores, key stores, streams and workers are closed and every ack is durable, so the
    interpreter's teardown (grpc core, Numba, thousands of module objects; 0.15–0.4 s a process) would
    only lengthen a restart, which bands wait out (the reconnect figures in BENCHMARKS.md). atexit
    handlers do not run: the project registers none, and those of its libraries only free memory. Under
    coverage.py (`COVERAGE_PROCESS_START` set), which saves its data at exit, the exit is a normal one."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if os.environ.get("COVERAGE_PROCESS_START"):
        sys.exit(code)
    os._exit(code)
