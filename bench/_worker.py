"""Child-process entry: ``python -m bench._worker MODULE JOB SPEC_JSON OUT_JSON``.

Runs ``bench.<MODULE>.JOBS[JOB](spec)`` and writes its result (a JSON-able dict) to OUT_JSON.
Started only by ``bench.common.run_job``.
"""
from __future__ import annotations

import importlib
import json
import sys


def main(argv: list[str]) -> int:
    module, job, spec_path, out_path = argv
    jobs = importlib.import_module(f"bench.{module}").JOBS
    with open(spec_path) as fh:
        spec = json.load(fh)
    result = jobs[job](spec)
    with open(out_path, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
