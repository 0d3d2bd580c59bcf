"""fmpipe train: flow-matching training on Ray Train (DDP workers fed by a Ray Data stream).

Reads a dataset written by `fmpipe prepare` (or another tool's WebDataset shards, indexed
first, in place), trains the U-Net velocity field with the CFM loss on `train.num_workers`
workers, checkpoints to the storage path (s3:// or a local directory) and logs to MLflow
(MLFLOW_TRACKING_URI, tracking.uri, or the local sqlite file in $FMPIPE_HOME). Re-running
the same command (same run name and storage) resumes from the last checkpoint, in the same
MLflow run, to the same images-seen total.

Defaults (jobs/configs/train.yaml): class-conditional digits at 16x16 on CPU; data.uri empty
means $FMPIPE_HOME/store/digits (what `fmpipe prepare --source digits` writes). data.channels
and model.num_classes left unset are the dataset's (0 classes on unlabelled data: an
unconditional model). The model is registered as train.registered_model_name, by default the
dataset's name (the last folder of --data: `digits` for the default dataset; `none`: not
registered); --alias points an alias of the registered model at this run's version, so
`fmpipe sample --model models:/digits@champion` can follow `fmpipe train --alias champion`.

key.path=value overrides may stand anywhere among the flags; a flag and an override of the
same key is an error.

Examples:
  fmpipe prepare --source digits && fmpipe train --alias champion
  fmpipe train --data s3://data/digits --storage s3://runs --run-name d1 --workers 2
  fmpipe train train.cpus_per_worker=0.5 --images 2000
  fmpipe train --config my.yaml train.total_images=400000 train.lr_schedule=cosine
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import (
    add_config_arguments,
    check_batch_split,
    overrides_from,
    parse_job_args,
    resolve_config,
    run_guarded,
    run_job,
    shortcut_values,
)
from pipeline.config import Config, default_names
from pipeline.home import data_uri


def _gpus_per_worker(text: str) -> bool:
    """``--gpus-per-worker`` 0 or 1 -> ``train.use_gpu`` (argparse's error names the flag)."""
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from 0, 1)")
    return text == "1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", metavar="URI", help="dataset root (data.uri)")
    parser.add_argument(
        "--run-name", metavar="N",
        help="run name; the same name resumes (train.run_name; default: the dataset's name)",
    )  # fmt: skip
    parser.add_argument(
        "--storage",
        metavar="URI",
        help="checkpoint storage, s3://bucket/prefix or a path (train.storage_path; "
        "default $FMPIPE_HOME/runs)",
    )
    parser.add_argument(
        "--workers", type=int, metavar="K", help="Ray Train workers (train.num_workers)"
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=_gpus_per_worker,
        metavar="G",
        help="0 (CPU, gloo) or 1 (one GPU each, nccl, bf16) (train.use_gpu)",
    )
    parser.add_argument(
        "--images", type=int, metavar="N", help="training images (train.total_images)"
    )
    parser.add_argument(
        "--alias",
        metavar="NAME",
        help="point this alias of the registered model at the run's version, e.g. champion "
        "(train.alias; needs train.registered_model_name)",
    )
    add_config_arguments(parser)
    return parser


# flag (argparse dest) -> config key
SHORTCUTS = {
    "data": "data.uri",
    "run_name": "train.run_name",
    "storage": "train.storage_path",
    "workers": "train.num_workers",
    "gpus_per_worker": "train.use_gpu",
    "images": "train.total_images",
    "alias": "train.alias",
}


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags given, as ``key=value`` overrides."""
    return overrides_from(shortcut_values(args, SHORTCUTS))


def last_checkpoint(cfg: Config) -> str:
    """The newest complete checkpoint of the run, as the resume line names it."""
    from pipeline.train.resume import describe, find_resume_point
    from pipeline.train.trainer import storage_location

    run_dir = storage_location(cfg).child(cfg.train.run_name)
    point = find_resume_point(run_dir)
    if point is None:
        return f"the start (no checkpoint yet in {run_dir.uri})"
    return f"{describe(point)} in {run_dir.uri}"


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)

    def body() -> int:
        cfg = resolve_config(args, defaults="train", shortcuts=SHORTCUTS)
        cfg.data.uri = data_uri(cfg)
        default_names(cfg)  # empty train.registered_model_name / run_name: the dataset's name
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        check_batch_split(cfg)
        # Imported here: `fmpipe train --help` does not import Ray or torch.
        from pipeline.rayenv import interrupts_as_keyboard_interrupt
        from pipeline.train.trainer import train

        print(
            f"fmpipe train: run '{cfg.train.run_name}', data {cfg.data.uri}, "
            f"{cfg.train.total_images:,} images, {cfg.train.num_workers} worker(s)"
        )

        def run() -> None:
            with interrupts_as_keyboard_interrupt():
                result = train(cfg)
            print("\n" + result.summary())

        return run_guarded(
            "train",
            run,
            lambda: f"re-run the same command to resume from {last_checkpoint(cfg)}",
            retry_hint="run the same command to resume from the last checkpoint",
        )

    return run_job(body, "train")


if __name__ == "__main__":
    sys.exit(main())
