"""fmpipe demo: the main job on embedded defaults (what `make demo` runs).

prepare digits -> train a class-conditional U-Net on Ray Train -> register it as
`digits` with alias `champion` -> sample 1,000 digits on a Ray actor pool -> score them
with the digits classifier (trained and registered as `digits-classifier` on the first run)
beside real held-out digits: Fréchet distance, conditional accuracy, confidence. Everything
lives under $FMPIPE_HOME (default ./.fmpipe); no servers to start. Overrides apply to
the combined config (jobs/configs/train.yaml + jobs/configs/demo.yaml), e.g.
`fmpipe demo train.total_images=20000 sample.num_samples=200`.
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import (
    add_config_arguments,
    check_batch_split,
    parse_job_args,
    resolve_config,
    run_guarded,
    run_job,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)

    def body() -> int:
        cfg = resolve_config(args, defaults=("train", "demo"))
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        check_batch_split(cfg)
        from pipeline.demo import demo_summary, run_demo
        from pipeline.rayenv import interrupts_as_keyboard_interrupt

        def run() -> None:
            with interrupts_as_keyboard_interrupt():
                result = run_demo(cfg)
            print("\n".join(demo_summary(result, cfg)))

        return run_guarded("demo", run, "re-run `fmpipe demo` to resume")

    return run_job(body, "demo")


if __name__ == "__main__":
    sys.exit(main())
