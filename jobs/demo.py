"""fmpipe demo: the main job on embedded defaults (what `make demo` runs).

prepare digits -> train a class-conditional U-Net on Ray Train -> register it as
`digits` with alias `champion` -> sample 1,000 digits on a Ray actor pool. Everything
lives under $FMPIPE_HOME (default ./.fmpipe); no servers to start. Overrides apply to
the combined config (jobs/configs/train.yaml + jobs/configs/demo.yaml), e.g.
`fmpipe demo train.total_images=20000 sample.num_samples=200`.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_config_arguments, packaged_defaults, run_job
from pipeline.config import load_config, merge_trees


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        defaults = merge_trees(packaged_defaults("train"), packaged_defaults("demo"))
        cfg = load_config(args.config, args.overrides, defaults=defaults)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        from pipeline.demo import demo_summary, run_demo

        result = run_demo(cfg)
        print("\n".join(demo_summary(result, cfg)))
        return 0

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
