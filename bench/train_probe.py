"""One process of ``bench distributed``: ``torchrun … bench/train_probe.py OUT_DIR <scripts/train.py arguments>``.

Runs scripts/train.py unchanged, with an optimizer-step hook that stamps the end of every step;
when it is done, writes OUT_DIR/rank<R>.json: the stamps (perf_counter), this process's CPU seconds
and its peak RSS (ru_maxrss, bytes).
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    out_dir, argv = sys.argv[1], sys.argv[2:]
    spec = importlib.util.spec_from_file_location("loralab_train_script", os.path.join(ROOT, "scripts", "train.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda opt, a, kw: stamps.append(time.perf_counter()))
    rc = script.main(argv)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.json"), "w") as fh:
        json.dump({"stamps": stamps, "cpu_s": usage.ru_utime + usage.ru_stime, "ru_maxrss": usage.ru_maxrss * 1024}, fh)
    return rc


if __name__ == "__main__":
    sys.exit(main())
