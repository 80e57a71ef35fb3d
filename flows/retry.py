"""Which task failures Prefect retries: only those that may pass on their own (Prefect retries every failure by
default, so bad input would fail three times, with a traceback each time)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def retry_if(transient: Callable[[BaseException], bool]) -> Callable[[Any, Any, Any], bool]:
    """A task's `retry_condition_fn`: retry when `transient(exception)` says the failure may pass."""

    def condition(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except Exception as exc:
            return transient(exc)
        return False

    return condition


def io_error(exc: BaseException) -> bool:
    """Files and network (OSError, connection errors included)."""
    return isinstance(exc, OSError)
