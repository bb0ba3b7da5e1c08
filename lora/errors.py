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

    if not t.is_floating_point() or t.numel() == 0:
        return
    # Screen with one reduction (no bool tensor the size of t): any NaN/inf makes the sum
    # non-finite. A sum that merely overflows is re-checked exactly, so it raises nothing. The sum
    # stays in t's dtype: for fp16/bf16 that is ~5x faster on the CPU than accumulating into float32
    # (reading a stack of files is dominated by this screen), and an overflow is rare and only slower.
    screen = t.sum()
    if bool(torch.isfinite(screen)):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise LoraError(f"{what} has {bad} non-finite value(s) (NaN or inf)", file=file, key=key)
