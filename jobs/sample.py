"""fmpipe sample: mass-produce samples of a trained flow on a Ray actor pool.

MODEL is models:/<name>@<alias>, models:/<name>/<version> (MLflow registry at
MLFLOW_TRACKING_URI, tracking.uri, or the local sqlite file in $FMPIPE_HOME), or a checkpoint
directory (local path or s3://...). The network's config travels with the checkpoint.

Output: WebDataset shards shard-NNNNNN.tar ({index:010d}.png + .json [+ .cls]) and a
_manifest.json under --out (s3://bucket/prefix or a local path). Sample i depends only on
(model, seed, i, solver settings): re-running the same command writes only the shards that
are missing, and the result is bit-identical whatever --batch-size or --actors. The run is
logged to MLflow (experiment tracking.sample_experiment) with a grid of the first 64 samples.

Examples:
  fmpipe sample --model models:/digits@champion --num-samples 1000 --out ./samples/digits
  fmpipe sample --model models:/digits/3 --num-samples 100000 --out s3://samples/d3 --actors 4
  fmpipe sample --model ./.fmpipe/runs/digits/checkpoint_000003 --out ./s --solver heun --steps 16
  fmpipe sample --model models:/digits@champion --out ./sevens --label 7 --guidance 2.0
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import (
    add_config_arguments,
    apply_sampling_rule,
    overrides_from,
    parse_job_args,
    resolve_config,
    run_guarded,
    run_job,
    shortcut_values,
    tagged_rule_unless_given,
)
from pipeline.config import ConfigError

# The solver table itself (torch-free): --help lists what pipeline.flow.solvers implements.
from pipeline.flow.solver_specs import ADAPTIVE_SOLVERS as ADAPTIVE_SOLVER_NAMES
from pipeline.flow.solver_specs import SOLVERS as SOLVER_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        metavar="MODEL",
        help="models:/<name>@<alias>, models:/<name>/<version> or a checkpoint URI (sample.model)",
    )
    parser.add_argument(
        "--num-samples", type=int, metavar="N", help="samples to generate (sample.num_samples)"
    )
    parser.add_argument(
        "--out", metavar="URI", help="output root, s3://bucket/prefix or a path (sample.out)"
    )
    parser.add_argument(
        "--solver",
        metavar="NAME",
        help=f"{' | '.join(SOLVER_NAMES)} (sample.solver; default euler)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        metavar="K",
        help=f"steps of a fixed-step solver; adaptive ones ({', '.join(ADAPTIVE_SOLVER_NAMES)}) "
        "ignore it (sample.steps)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="S", help="noise of sample i comes from (S, i) (sample.seed)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="samples an actor holds and encodes at once (sample.batch_size)",
    )
    parser.add_argument(
        "--actors", type=int, metavar="A", help="actors in the pool (sample.num_actors)"
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        default=None,
        help="one GPU per actor (sample.use_gpu=true)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        metavar="G",
        help="classifier-free guidance scale, 1 = plain conditional (sample.guidance_scale)",
    )
    parser.add_argument(
        "--label",
        type=int,
        metavar="L",
        help="class of every sample; default cycles i %% classes (sample.label)",
    )
    parser.add_argument(
        "--pairs",
        action="store_true",
        default=None,
        help="a coupled set for fmpipe reflow: also write each sample's float32 x_1 "
        "(<key>.x1.npy; x_0 is regenerated from the seed) (sample.pairs=true)",
    )
    parser.add_argument(
        "--eval",
        action="store_true",
        help="then score the samples (fmpipe eval --samples OUT: eval.* settings; the "
        "reference is the model's training data unless data.uri is set)",
    )
    add_config_arguments(parser)
    return parser


# flag (argparse dest) -> config key
SHORTCUTS = {
    "model": "sample.model",
    "num_samples": "sample.num_samples",
    "out": "sample.out",
    "solver": "sample.solver",
    "steps": "sample.steps",
    "seed": "sample.seed",
    "batch_size": "sample.batch_size",
    "actors": "sample.num_actors",
    "gpu": "sample.use_gpu",
    "guidance": "sample.guidance_scale",
    "label": "sample.label",
    "pairs": "sample.pairs",
}


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags given, as ``key=value`` overrides."""
    return overrides_from(shortcut_values(args, SHORTCUTS))


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)

    def body() -> int:
        cfg = resolve_config(args, shortcuts=SHORTCUTS)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        if not cfg.sample.model.strip():
            raise ConfigError(
                "sample.model is empty: pass --model models:/<name>@<alias>, "
                "models:/<name>/<version> or a checkpoint directory"
            )
        # Imported here: `fmpipe sample --help` stays fast.
        from pipeline.sample import generate

        def action() -> None:
            # inside the guard: a missing model fails here as it would in generate
            model = cfg.sample.model.strip()
            rule = tagged_rule_unless_given(cfg, args, SHORTCUTS, model, "sample")
            apply_sampling_rule(cfg, "sample", rule)
            result = generate(cfg)
            if args.eval:
                from pipeline.eval.job import evaluate, with_reference_data

                scored = evaluate(
                    with_reference_data(cfg, cfg.sample.model), samples=result.out_uri
                )
                for line in scored.summary_lines():
                    print(line)

        return run_guarded(
            "sample",
            action,
            "re-run the same command to write the missing shards (the complete ones are kept)",
            # a malformed models:/ URI or an empty model: the input (SampleJobError is one too)
            bad_input=(ValueError,),
        )

    return run_job(body, "sample")


if __name__ == "__main__":
    sys.exit(main())
