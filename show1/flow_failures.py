"""A failed flow as a person reads it at the terminal: one `error:` line with the exception's message.

Prefect logs a traceback at each level a failure passes through (the task, each subflow, the flow), and the
exception then leaves the call with one more: for one bad input, hundreds of lines. `run_flow` runs a flow so that
the console shows each of Prefect's lines without its traceback and the failure ends in FlowFailed, one line; the
tracebacks go to a file whose path that line names (a bug stays traceable). A Prefect server's run logs keep them
whole: its log handler sees each record before the console does.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


class FlowFailed(RuntimeError):
    """A flow run failed; the message is its exception's, and where the tracebacks were written (if they were)."""

    def __init__(self, message: str, tracebacks: Path | None = None):
        super().__init__(message + (f" (tracebacks: {tracebacks})" if tracebacks else ""))
        self.tracebacks = tracebacks


class TracebacksToFile(logging.Filter):
    """On a console handler: a record's traceback goes to `path` (created on the first one), its line stays."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.written = False
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text or record.stack_info:
            text = logging.Formatter("%(asctime)s | %(levelname)s | %(name)s - %(message)s").format(record)
            self._append(text)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True

    def write_exception(self, exc: BaseException) -> None:
        self._append("".join(traceback.format_exception(exc)).rstrip())

    def _append(self, text: str) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as log:
            log.write(text + "\n\n")
            self.written = True


def traceback_file() -> Path:
    """A new file name for one command's tracebacks, in the temporary folder (never in the project)."""
    return Path(tempfile.gettempdir()) / f"show1-run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _console_handlers() -> list[logging.Handler]:
    from prefect.logging.handlers import PrefectConsoleHandler

    return [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]


def message(exc: BaseException) -> str:
    """What an error line says: show1's own errors by their message; anything else (a bug, a library's error) with
    its type too."""
    text = str(exc).strip()
    if type(exc).__module__.split(".")[0] in ("show1", "flows") and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_flow(flow: Callable[..., Any], *args: Any, verbose: bool = False, **kwargs: Any) -> Any:
    """`flow(*args, **kwargs)`'s result; a failure raises FlowFailed. Unless `verbose`, the console shows Prefect's
    log lines without their tracebacks, which go to a file (`traceback_file`) that FlowFailed names."""
    log = None if verbose else TracebacksToFile(traceback_file())
    handlers = _console_handlers() if log is not None else []
    for handler in handlers:
        handler.addFilter(log)
    try:
        try:
            state = flow(*args, return_state=True, **kwargs)
        except Exception as exc:  # the engine itself failed (e.g. its temporary server did not start)
            if log is None:
                raise
            log.write_exception(exc)
            raise FlowFailed(message(exc), log.path) from None
        if state.is_completed():
            return state.result()
        exc = state.result(raise_on_failure=False)  # a failed, crashed or cancelled run's exception
        if not isinstance(exc, BaseException):
            raise FlowFailed(state.message or f"the flow run ended {state.type.value.lower()}")
        if log is not None and not log.written:
            log.write_exception(exc)
        raise FlowFailed(message(exc), log.path if log is not None else None)
    finally:
        for handler in handlers:
            handler.removeFilter(log)
