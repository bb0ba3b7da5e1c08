"""Errors of the training path. A subclass of LoraError, so callers catch one type for every
problem a user can fix by changing an input (a file, a count, a rank)."""
from __future__ import annotations

from ..lora.errors import LoraError


class TrainingError(LoraError):
    """An input the trainer cannot use, or a run that had to stop.

    ``result`` holds the last good state (a ``TrainResult``) when the run had already trained
    some steps, e.g. when the loss turned NaN, so nothing learned so far is lost.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None, result=None):
        super().__init__(message, file=file, key=key)
        self.result = result
