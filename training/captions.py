"""Caption handling as kohya sd-scripts does it (library/train_util.py, ``process_caption``),
applied per training step so every step can see another variant of a caption.

For each sample at each step, in kohya's order:

1. caption dropout: with probability ``dropout_rate`` the caption becomes "" (the model learns the
   unconditional case, which classifier-free guidance samples with);
2. otherwise, when shuffling or tag dropout is on, the caption is split at ``separator`` (","),
   each tag stripped; the first ``keep_tokens`` tags stay in place (e.g. a trigger word), the rest
   are shuffled (``shuffle``), then each of those is dropped with probability ``tag_dropout_rate``;
   the result is joined with ", ";
3. with none of these on, the caption is used as written.

Randomness comes from a ``random.Random`` seeded from (training seed, step, micro-batch, position
in the batch), so the same seed gives the same caption sequence, and a resumed run the same
captions an uninterrupted one would see (kohya draws from the process-wide ``random``).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from .errors import TrainingError


@dataclass(frozen=True)
class CaptionOptions:
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0
    separator: str = ","

    def check(self) -> "CaptionOptions":
        if not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            raise TrainingError(f"keep_tokens = {self.keep_tokens} must be a whole number ≥ 0")
        for name in ("dropout_rate", "tag_dropout_rate"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise TrainingError(f"caption {name} = {v} must be between 0 and 1")
        if not self.separator:
            raise TrainingError("the caption separator is empty")
        return self

    @property
    def varies(self) -> bool:
        """True when a caption can differ from step to step (so its encoding cannot be fixed once)."""
        return self.shuffle or self.dropout_rate > 0 or self.tag_dropout_rate > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "CaptionOptions":
        if not d:
            return cls()
        known = {k: d[k] for k in ("shuffle", "keep_tokens", "dropout_rate", "tag_dropout_rate", "separator") if k in d}
        return cls(**known).check()


def process(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """One variant of ``caption`` (kohya's process_caption without wildcards/prefixes)."""
    if options.dropout_rate > 0 and rng.random() < options.dropout_rate:
        return ""
    if not (options.shuffle or options.tag_dropout_rate > 0):
        return caption
    tokens = [t.strip() for t in caption.strip().split(options.separator)]
    fixed, flex = tokens[: options.keep_tokens], tokens[options.keep_tokens:]
    if options.shuffle:
        rng.shuffle(flex)
    if options.tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= options.tag_dropout_rate]
    return ", ".join(fixed + flex)


def tags(caption: str, separator: str = ",") -> list[str]:
    """The tags of a caption as kohya counts them for ss_tag_frequency (stripped, lower case)."""
    return [t.strip().lower() for t in caption.split(separator) if t.strip()]


__all__ = ["CaptionOptions", "process", "tags"]
