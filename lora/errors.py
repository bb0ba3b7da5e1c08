"""One error type for every problem with a LoRA file, so callers can catch it and users read
what went wrong, where (file, key) and what was expected."""
from __future__ import annotations


class LoraError(ValueError):
    """A LoRA file (or a value derived from it) that cannot be used as asked.

    The message always names the file and, where there is one, the key and the shapes or values
    involved. ``file`` and ``key`` are kept as attributes for programmatic use.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key = file, key
        where = ", ".join(p for p in (f"file {file!r}" if file else "", f"key {key!r}" if key else "") if p)
        super().__init__(f"{where}: {message}" if where else message)


def check_finite(t, *, what: str, file: str | None = None, key: str | None = None) -> None:
    """Refuse NaN/inf: a merged non-finite value silently ruins every image that follows."""
    import torch

    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise LoraError(f"{what} has {bad} non-finite value(s) (NaN or inf)", file=file, key=key)
