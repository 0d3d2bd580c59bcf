"""fmpipe toy: train a 2-D flow (N(0,I) or 8 Gaussians -> two moons) and plot it.

Plain PyTorch on CPU, no Ray: the smallest end-to-end check of the flow core.
"""

from __future__ import annotations

import argparse
import sys

import torch

from jobs._common import add_config_arguments, parse_job_args, resolve_config, run_job
from pipeline.data.toy import toy_sampler
from pipeline.eval.metrics import sliced_wasserstein2
from pipeline.home import toy_dir
from pipeline.models import count_parameters
from pipeline.toy2d import plot_toy, sample_toy, train_toy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe toy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", help="output directory (toy.out); default $FMPIPE_HOME/toy")
    parser.add_argument("--images", type=int, help="training images (train.total_images)")
    add_config_arguments(parser)
    return parser


# flag (argparse dest) -> config key
SHORTCUTS = {"out": "toy.out", "images": "train.total_images"}


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)

    def body() -> int:
        cfg = resolve_config(args, defaults="toy", shortcuts=SHORTCUTS)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        out = toy_dir(cfg)
        print(f"training {cfg.toy.source} -> {cfg.toy.target}, {cfg.train.total_images:,} images")
        result = train_toy(cfg)
        print(f"model: {cfg.model.kind}, {count_parameters(result.model):,} parameters")
        solution = sample_toy(
            result.model, cfg, cfg.sample.num_samples, seed=cfg.seed + 1, return_trajectory=True
        )
        reference = toy_sampler(cfg.toy.target)(
            cfg.sample.num_samples, torch.Generator().manual_seed(cfg.seed + 2)
        )
        sw2 = sliced_wasserstein2(solution.x_1, reference)
        png = plot_toy(solution, reference, out / "toy2d.png", cfg.toy.num_trajectories)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": result.model.state_dict(), "config": cfg.to_dict()}, out / "toy2d.pt")
        print(
            f"\ndone in {result.wall_seconds:.1f} s: final loss {result.losses[-1]:.4f}, "
            f"{cfg.sample.solver} NFE {solution.nfe}, sliced W2 to fresh data {sw2:.4f}\n"
            f"plot:  {png}\nmodel: {out / 'toy2d.pt'}"
        )
        return 0

    return run_job(body, "toy")


if __name__ == "__main__":
    sys.exit(main())
