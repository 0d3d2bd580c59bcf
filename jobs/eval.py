"""fmpipe eval: how good are the samples? Fréchet distance, KID, precision/recall, accuracy.

Scores a sample set (--samples, the output of `fmpipe sample`) or a model (--model: it first
generates eval.num_samples samples at the fixed eval.seed with --solver/--steps; a
registered version that carries its own sampling rule, e.g. a distilled k-step student, with
that rule unless --solver/--steps/eval.* say otherwise) against the reference statistics of
a dataset split (data.uri, eval.reference_split: train, as FID is usually reported; computed
once by a Ray Data job and stored under train.storage_path/eval-reference/, reused
afterwards). A model's reference is the data it learnt (its checkpoint's data.uri) unless
--data says otherwise; so is a sample set's (the data its model learnt, by the model its
manifest names).

Feature networks (--network):
  classifier  fmpipe's classifier of the dataset (`fmpipe classifier` trains and registers it
              as models:/<dataset>-classifier@champion): an in-domain Fréchet distance plus
              conditional accuracy and confidence. The meaningful one at 16x16.
  inception   the TF Inception-v3 (2015-12-05) of FID, 2048-d pool features, images resized
              bilinearly to 299x299; weights from eval.inception_uri (default: NVIDIA's
              public TorchScript file, cached under $FMPIPE_HOME/cache/features).

Published statistics (--reference-stats, eval.reference_stats): an .npz with mu (d,) and
sigma (d, d), as pytorch-fid, clean-fid, edm's fid-refs and ADM's reference batches store
them, replaces the split's reference, so the FID can stand beside a published one (same
network, images and resolution; KID and precision/recall need features and are not
computed). edm2's .pkl files are pickles, never loaded: save their mu and sigma with
numpy.savez first.

Each figure is printed with the sample counts behind it, logged to an MLflow run (experiment
tracking.eval_experiment) and, for a registered model, set as tags eval.<network>.<figure> on its
version. --sweep evaluates a model for every solver x steps of eval.sweep_solvers and
eval.sweep_steps: a table and a plot of the Fréchet distance against NFE. Give --model more
than once to compare models (a base, its reflow, a distilled student) in one sweep: the same
seeds, one reference (the first model's data), one plot and one MLflow run.

Examples:
  fmpipe eval --samples ./.fmpipe/store/samples/digits
  fmpipe eval --model models:/digits@champion --num-samples 2000 --solver heun --steps 8
  fmpipe eval --model models:/digits@champion --sweep eval.sweep_steps=[2,4,8,16]
  fmpipe eval --sweep --model models:/digits/2 --model models:/digits/3 eval.sweep_steps=[1,2,4]
  fmpipe eval --samples s3://samples/d3 --network inception --data s3://datasets/digits
  fmpipe eval --samples s3://samples/c10 --network inception --reference-stats ./cifar10.npz
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import (
    add_config_arguments,
    apply_sampling_rule,
    parse_job_args,
    resolve_config,
    run_guarded,
    run_job,
    tagged_rule_unless_given,
)
from pipeline.config import Config, ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--samples", metavar="URI", help="a finished `fmpipe sample` output")
    what.add_argument(
        "--model",
        metavar="MODEL",
        action="append",
        help="models:/<name>@<alias>, models:/<name>/<v> or a checkpoint; several with --sweep",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="with --model: every solver x steps of the sweep"
    )
    parser.add_argument("--network", metavar="NAME", help="classifier | inception (eval.network)")
    parser.add_argument(
        "--classifier", metavar="URI", help="the classifier to use (eval.classifier)"
    )
    parser.add_argument(
        "--data", metavar="URI", help="the dataset whose split is the reference (data.uri)"
    )
    parser.add_argument(
        "--split", metavar="NAME", help="the reference split (eval.reference_split; train)"
    )
    parser.add_argument(
        "--reference-stats",
        metavar="URI",
        help="published mu/sigma .npz instead of the split (eval.reference_stats)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        metavar="N",
        help="samples a --model generates (eval.num_samples)",
    )
    parser.add_argument(
        "--solver",
        metavar="NAME",
        help="solver of --model (eval.solver; default: a version's own fmpipe.sample.* rule)",
    )
    parser.add_argument("--steps", type=int, metavar="K", help="its steps (eval.steps)")
    parser.add_argument("--actors", type=int, metavar="A", help="feature actors (eval.num_actors)")
    parser.add_argument(
        "--gpu", action="store_true", default=None, help="one GPU per actor (eval.use_gpu=true)"
    )
    add_config_arguments(parser)
    return parser


# flag (argparse dest) -> config key
SHORTCUTS = {
    "network": "eval.network",
    "classifier": "eval.classifier",
    "data": "data.uri",
    "split": "eval.reference_split",
    "reference_stats": "eval.reference_stats",
    "num_samples": "eval.num_samples",
    "solver": "eval.solver",
    "steps": "eval.steps",
    "actors": "eval.num_actors",
    "gpu": "eval.use_gpu",
}


def own_sampling_rule(cfg: Config, args: argparse.Namespace) -> tuple[str, int] | None:
    """The ``(solver, steps)`` one --model (no --sweep) carries in its registry tags, when
    neither eval.solver nor eval.steps was given on the command line; else None."""
    if not args.model or args.sweep:
        return None
    return tagged_rule_unless_given(cfg, args, SHORTCUTS, args.model[0], "eval")


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)

    def body() -> int:
        cfg = resolve_config(args, "train", shortcuts=SHORTCUTS)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        if not (args.samples or args.model):
            raise ConfigError("nothing to evaluate: pass --samples URI or --model MODEL")
        if args.sweep and not args.model:
            raise ConfigError("--sweep evaluates a model over solvers and steps: pass --model")
        if len(args.model or []) > 1 and not args.sweep:
            raise ConfigError(
                f"{len(args.model)} --model given: several models are compared over solvers "
                "and steps, add --sweep (or give one --model)"
            )
        # Imported here: `fmpipe eval --help` stays fast.
        from pipeline.eval.job import evaluate

        def action() -> None:
            # inside the guard: a missing model fails here as it would in evaluate
            apply_sampling_rule(cfg, "eval", own_sampling_rule(cfg, args))
            result = evaluate(cfg, samples=args.samples or "", model=args.model or [],
                              sweep=args.sweep)  # fmt: skip
            for line in result.summary_lines():
                print(line)

        return run_guarded(
            "eval",
            action,
            "re-run the same command: the reference statistics and samples already written "
            "are reused",
            bad_input=(ValueError,),
        )

    return run_job(body, "eval")


if __name__ == "__main__":
    sys.exit(main())
