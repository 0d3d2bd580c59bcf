"""fmpipe reflow: few-step generation by rectified flow (k-reflow) of a trained model.

Samples --pairs N (noise, sample) pairs of --base with the sample section's sampler (each
sample's float32 x_1 kept, its x_0 regenerated from the seed), then trains a new flow on
those fixed pairs through the same Ray Train loop, starting from the base's weights, and
registers it with its lineage (fmpipe.reflow.k, base, pair set). Its paths are straighter,
so a few Euler steps reach what the base needed many for. Re-running the same command
reuses the complete pair set and resumes the training run. With train.eval_every_images the
run also scores its EMA weights (eval.network: the dataset's classifier by default, see
`fmpipe classifier`) and tags the registered version with the figures: sample, train,
evaluate and register in one job, on a cluster with `fmpipe submit reflow ...`; then
`fmpipe retrain --candidate` promotes it when it beats the champion at its NFE budget.

Examples:
  fmpipe reflow --base models:/digits@champion --pairs 20000 --images 200000
  fmpipe reflow --base models:/digits/3 sample.steps=64 train.lr=1e-4
  fmpipe submit reflow --base models:/digits@champion train.eval_every_images=40000
  fmpipe reflow --base models:/digits/4 --distill 1     # a 1-step student of the 2-RF v4
  fmpipe sample --model models:/digits/4 --steps 2       # then sample with 2 steps
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_config_arguments, parse_job_args, resolve_config, run_guarded, run_job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe reflow",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--base", metavar="MODEL", help="the model to straighten: models:/..., or a checkpoint "
        "(reflow.base)",
    )  # fmt: skip
    parser.add_argument("--pairs", type=int, metavar="N", help="pairs to sample (reflow.num_pairs)")
    parser.add_argument("--pairs-out", metavar="URI", help="where the pairs go (reflow.pairs_out)")
    parser.add_argument(
        "--images", type=int, metavar="N", help="images to train on (train.total_images)"
    )
    parser.add_argument(
        "--distill", type=int, metavar="K", help="train a K-step student on the pairs instead "
        "(train.objective=distill, train.distill_steps=K; loss: train.distill_loss; where its "
        "jumps start in training: train.distill_states)",
    )  # fmt: skip
    parser.add_argument("--run-name", metavar="NAME", help="the training run (train.run_name)")
    parser.add_argument("--storage", metavar="URI", help="runs and pairs (train.storage_path)")
    parser.add_argument(
        "--register", metavar="NAME", help="registered model name (train.registered_model_name)"
    )
    add_config_arguments(parser)
    return parser


SHORTCUTS = {
    "base": "reflow.base",
    "pairs": "reflow.num_pairs",
    "pairs_out": "reflow.pairs_out",
    "images": "train.total_images",
    "run_name": "train.run_name",
    "storage": "train.storage_path",
    "register": "train.registered_model_name",
    "distill": "train.distill_steps",
}


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)

    def body() -> int:
        cfg = resolve_config(args, ["train", "reflow"], shortcuts=SHORTCUTS)
        if args.distill is not None:
            cfg.train.objective = "distill"
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        from pipeline.reflow import reflow

        def action() -> None:
            for line in reflow(cfg).summary_lines():
                print(line)

        return run_guarded("reflow", action, "re-run the same command to resume")

    return run_job(body, "reflow")


if __name__ == "__main__":
    sys.exit(main())
