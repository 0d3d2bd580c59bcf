"""The jobs fmpipe has: name -> entry-point module, one-line summary, and whether it can run on a
cluster through ``fmpipe submit``.

It lives in the library (standard library only, nothing imported from ``jobs/``) so that both
the console script (:mod:`jobs.cli`) and :mod:`pipeline.submit` read the same table, and the
library never imports the entry points above it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["JOBS", "Job", "submittable"]


@dataclass(frozen=True)
class Job:
    """One job: ``python -m <module>`` runs it; ``summary`` is its line in ``fmpipe --help``."""

    name: str
    summary: str
    submittable: bool = True  # False: makes no sense on a cluster (or would recurse)

    @property
    def module(self) -> str:
        return f"jobs.{self.name}"


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job(
            "prepare",
            "write WebDataset shards + manifests from digits, a folder or synthetic shapes",
        ),
        Job(
            "index",
            "index WebDataset shards fmpipe did not write (in place): samples, labels, bad members",
        ),
        Job(
            "train", "train a flow-matching U-Net on Ray Train (DDP, checkpoints, MLflow; resumes)"
        ),
        Job(
            "sample",
            "generate N samples of a trained model into WebDataset shards on a Ray actor pool",
        ),
        Job(
            "classifier",
            "train the dataset's classifier that `fmpipe eval` scores samples with (registered)",
        ),
        Job(
            "eval",
            "score samples or a model: Fréchet distance (FID), KID, precision/recall, accuracy",
        ),
        Job(
            "reflow",
            "few-step generation: train a rectified flow on a model's own (noise, sample) pairs",
        ),
        Job(
            "retrain",
            "scheduled retraining: new data -> train, evaluate vs champion, promote if better",
        ),
        Job(
            "stack",
            "local stack on 127.0.0.1: SeaweedFS S3, MLflow server, Ray head (up|down|status)",
            submittable=False,
        ),
        Job(
            "submit",
            "run a job on a Ray cluster (Jobs API): ships the code, follows logs, exit status",
            submittable=False,
        ),
        Job("toy", "train a 2-D flow (N(0,I) or 8 Gaussians -> two moons) and plot it"),
        Job("bench", "benchmarks that print a ratio against a named baseline"),
        Job("demo", "the main job on embedded defaults (what `make demo` runs)"),
    )
}


def submittable() -> list[str]:
    """Names of the jobs ``fmpipe submit`` may run, in table order."""
    return [name for name, job in JOBS.items() if job.submittable]
