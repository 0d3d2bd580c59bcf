"""``fmpipe``: one console script, one subcommand per job.

Each job lives in ``jobs/<name>.py`` with ``main(argv) -> int`` and also runs as
``python -m jobs.<name>``, so ``ray job submit --working-dir . -- python -m jobs.train``
works on any cluster. Jobs are imported lazily: ``fmpipe --help`` does not import Ray.
"""

from __future__ import annotations

import importlib
import sys

from pipeline.jobtable import JOBS as _TABLE

# name -> one-line summary (the job module's own --help has the rest); the table itself,
# with the modules and which jobs are submittable, is pipeline.jobtable.
JOBS: dict[str, str] = {name: job.summary for name, job in _TABLE.items()}


def _usage() -> str:
    width = max(len(name) for name in JOBS)
    lines = [f"  {name:<{width}}  {summary}" for name, summary in JOBS.items()]
    return (
        "usage: fmpipe <job> [--help] [options]\n\n"
        "Flow-matching pipeline on Ray. Jobs:\n" + "\n".join(lines) + "\n\n"
        "Run `fmpipe <job> --help` for a job's options.\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage(), end="")
        return 0
    name, rest = args[0], args[1:]
    if name not in JOBS:
        print(f"fmpipe: unknown job '{name}'; choose one of: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(_TABLE[name].module)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
