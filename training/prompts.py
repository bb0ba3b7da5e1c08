"""Sample prompts in kohya's format (train_util.py, ``sample_images``): one prompt per line, options
after `` --``:

    a photo of sks dog, in the snow --n blurry, lowres --w 512 --h 768 --d 42 --l 7 --s 20 --ss euler

--n negative prompt, --w / --h size in pixels (rounded down to multiples of 8; default: the
training resolution), --d seed (default: the training seed), --l CFG scale (7.5), --s steps (30),
--ss sampler (ComfyUI's names; kohya's k_euler / euler_a / ddim / dpmsolver++ ... are mapped).
Empty lines and lines starting with # are skipped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import TrainingError

# kohya's sampler names -> ComfyUI's
KOHYA_SAMPLERS = {"ddim": "ddim", "pndm": "euler", "lms": "lms", "k_lms": "lms", "euler": "euler", "k_euler": "euler",
                  "euler_a": "euler_ancestral", "k_euler_a": "euler_ancestral", "dpmsolver": "dpmpp_2m",
                  "dpmsolver++": "dpmpp_2m", "dpmsingle": "dpmpp_2m", "heun": "heun", "k_heun": "heun",
                  "dpm_2": "dpm_2", "k_dpm_2": "dpm_2", "dpm_2_a": "dpm_2_ancestral", "k_dpm_2_a": "dpm_2_ancestral"}


@dataclass
class Prompt:
    text: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    cfg: float = 7.5
    steps: int = 30
    sampler: str = "euler"


def parse(text: str, samplers: list[str] | None = None) -> list[Prompt]:
    """Every prompt in ``text``; raises TrainingError naming the line and option that is wrong."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\s+--(?=[a-z]+\b)", line)
        p = Prompt(parts[0].strip())
        for opt in parts[1:]:
            key, _, value = opt.partition(" ")
            value = value.strip()
            try:
                if key == "n":
                    p.negative = value
                elif key in ("w", "h"):
                    v = int(value)
                    if not 64 <= v <= 8192:
                        raise ValueError("a size from 64 to 8192")
                    setattr(p, "width" if key == "w" else "height", v // 8 * 8)
                elif key == "d":
                    p.seed = int(value)
                elif key == "l":
                    p.cfg = float(value)
                elif key == "s":
                    p.steps = int(value)
                    if not 1 <= p.steps <= 1000:
                        raise ValueError("1 to 1000 steps")
                elif key == "ss":
                    p.sampler = KOHYA_SAMPLERS.get(value.lower(), value)
                    if samplers is not None and p.sampler not in samplers:
                        raise ValueError(f"one of {', '.join(samplers)}")
                else:
                    raise ValueError("one of --n --w --h --d --l --s --ss")
            except ValueError as e:
                hint = str(e) if not str(e).startswith(("invalid literal", "could not convert")) else "a number"
                raise TrainingError(f"sample_prompt line {n}: --{key} {value!r} is not valid (expected {hint})") from None
        if not p.text:
            raise TrainingError(f"sample_prompt line {n} has options but no prompt")
        out.append(p)
    return out


__all__ = ["KOHYA_SAMPLERS", "Prompt", "parse"]
