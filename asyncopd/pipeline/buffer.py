"""Completed, scored batches waiting for the learner, handed over strictly in batch order."""

import threading
from typing import Generic, TypeVar

from asyncopd.pipeline.admission import PipelineClosed

T = TypeVar("T")


class BatchBuffer(Generic[T]):
    def __init__(self) -> None:
        self._items: dict[int, T] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._cond = threading.Condition()

    def put(self, batch_index: int, item: T) -> None:
        with self._cond:
            self._items[batch_index] = item
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """A producer died: wake the consumer so it re-raises instead of hanging."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def get(self, batch_index: int) -> T:
        with self._cond:
            self._cond.wait_for(lambda: batch_index in self._items or self._error is not None or self._closed)
            if batch_index in self._items:
                return self._items.pop(batch_index)
            if self._error is not None:
                raise RuntimeError(f"a pipeline stage failed before batch {batch_index}") from self._error
            raise PipelineClosed("pipeline closed")
