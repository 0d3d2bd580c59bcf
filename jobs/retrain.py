"""fmpipe retrain: scheduled retraining with promotion in the MLflow registry.

Safe from any scheduler at any frequency (cron, KubeRay RayCronJob, a loop):
  - no new data (the train split's manifest hash equals the one the `champion` version
    was trained on, tag manifest_hash): records that on the registered model, exits 0;
  - this data already evaluated against this champion (promoted or rejected): exits 0;
  - another retrain of the same model holds the lock: exits 0 (it does the work);
  - new data: a candidate continues from the champion's checkpoint (or trains from
    scratch with no champion or retrain.from_scratch=true) for retrain.images images,
    is evaluated with the champion on the same val split and fixed draws, registered as a
    new version (tags manifest_hash, images_seen, val_loss, champion_val_loss, ...), and
    the alias moves to it only when its retrain.metric (val_loss; or fd_classifier / fid:
    the Fréchet distance of eval.num_samples samples at eval.seed, candidate and champion
    alike) < the champion's - retrain.promote_margin; otherwise the version is tagged
    `rejected` with the reason (both figures tagged).
A registered version made without new data (a reflow or a distilled student of the
champion, `fmpipe reflow`) is judged with --candidate MODEL instead: sampled at its own
sampling rule (its fmpipe.sample.* tags) or else the champion's, against the champion at its
rule, by retrain.metric (fd_classifier or fid); the alias moves to it only when it needs no
more NFE per sample than the champion and its Fréchet distance is lower by the margin (see
pipeline/promote.py).
Two runs at once promote at most once: an exclusive lease (S3 conditional writes, or
flock on a local path) under <train.storage_path>/_locks/, and a compare-and-set of the
alias under it (see pipeline/retrain.py).

Defaults: jobs/configs/train.yaml (the digits model of `fmpipe train`) < jobs/configs/retrain.yaml.

Examples:
  fmpipe retrain
  fmpipe retrain --data s3://data/digits --storage s3://runs retrain.images=40000
  fmpipe retrain --config my.yaml retrain.promote_margin=0.002 retrain.from_scratch=true
  fmpipe submit retrain --data s3://data/digits --storage s3://runs   # on a Ray cluster
  fmpipe retrain --candidate models:/digits/7 --metric fd_classifier   # a reflowed version

Exit status: 0 for every outcome above (promoted, rejected, no new data, busy); 2 for bad
input (a config error, a missing dataset or model); 130 when interrupted; 1 for any other
failure (storage or registry unreachable, a worker that kept failing), with the traceback in
$FMPIPE_HOME/logs/.
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
from pipeline.config import default_names
from pipeline.home import data_uri


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe retrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", metavar="URI", help="dataset root (data.uri)")
    parser.add_argument(
        "--storage",
        metavar="URI",
        help="checkpoint storage and lock location, s3://bucket/prefix or a path "
        "(train.storage_path; default $FMPIPE_HOME/runs)",
    )
    parser.add_argument(
        "--model-name", metavar="NAME", help="registered model (train.registered_model_name)"
    )
    parser.add_argument(
        "--images", type=int, metavar="N", help="candidate training images (retrain.images)"
    )
    parser.add_argument(
        "--margin", type=float, metavar="M", help="promotion margin (retrain.promote_margin)"
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        default=None,
        help="fresh weights, not the champion's (retrain.from_scratch=true)",
    )
    parser.add_argument(
        "--candidate", metavar="MODEL", help="judge this registered version (a reflow, a "
        "student) instead of training one: models:/<name>/<version> (retrain.candidate)",
    )  # fmt: skip
    parser.add_argument(
        "--metric", metavar="NAME", help="what decides: val_loss | fd_classifier | fid "
        "(retrain.metric)",
    )  # fmt: skip
    add_config_arguments(parser)
    return parser


# flag (argparse dest) -> config key
SHORTCUTS = {
    "data": "data.uri",
    "storage": "train.storage_path",
    "model_name": "train.registered_model_name",
    "images": "retrain.images",
    "margin": "retrain.promote_margin",
    "from_scratch": "retrain.from_scratch",
    "candidate": "retrain.candidate",
    "metric": "retrain.metric",
}


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags given, as ``key=value`` overrides."""
    return overrides_from(shortcut_values(args, SHORTCUTS))


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)

    def body() -> int:
        cfg = resolve_config(args, defaults=("train", "retrain"), shortcuts=SHORTCUTS)
        cfg.data.uri = data_uri(cfg)
        default_names(cfg)  # empty train.registered_model_name / run_name: the dataset's name
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        check_batch_split(cfg)
        # Imported here: `fmpipe retrain --help` does not import Ray, torch or MLflow.
        from pipeline.rayenv import interrupts_as_keyboard_interrupt

        if cfg.retrain.candidate.strip():
            from pipeline.promote import judge_candidate as step
        else:
            from pipeline.retrain import retrain as step

        def run() -> None:
            with interrupts_as_keyboard_interrupt():
                step(cfg)

        return run_guarded("retrain", run, "the next run resumes the candidate")

    return run_job(body, "retrain")


if __name__ == "__main__":
    sys.exit(main())
