"""``fmpipe``: one console script, one subcommand per job.

Each job lives in ``jobs/<name>.py`` with ``main(argv) -> int`` and also runs as
``python -m jobs.<name>``, so ``ray job submit --working-dir . -- python -m jobs.train``
works on any cluster. Jobs are imported lazily: ``fmpipe --help`` does not import Ray.
"""

from __future__ import annotations

import importlib
import sys

# name -> one-line summary (the job module's own --help has the rest)
JOBS: dict[str, str] = {
    "prepare": "write WebDataset shards + manifests from digits, a folder or synthetic shapes",
    "train": "train a flow-matching U-Net on Ray Train (DDP, checkpoints, MLflow; resumes)",
    "sample": "generate N samples of a trained model into WebDataset shards on a Ray actor pool",
    "retrain": "scheduled retraining: new data -> train, evaluate vs champion, promote if better",
    "stack": "local stack on 127.0.0.1: SeaweedFS S3, MLflow server, Ray head (up|down|status)",
    "submit": "run a job on a Ray cluster (Jobs API): ships the code, follows logs, exit status",
    "toy": "train a 2-D flow (N(0,I) or 8 Gaussians -> two moons) and plot it",
    "bench": "benchmarks that print a ratio against a named baseline",
    "demo": "the main job on embedded defaults (what `make demo` runs)",
}


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
    module = importlib.import_module(f"jobs.{name}")
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
