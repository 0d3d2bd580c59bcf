"""fmpipe bench: benchmarks that print a ratio against a named baseline, side by side.

fmpipe bench toy    2-D example: sliced W2 per solver vs two independent data draws
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_config_arguments, resolve_config, run_job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{toy,data}")
    toy = sub.add_parser("toy", help="2-D example: sample quality per solver vs the data floor")
    toy.add_argument("--num-samples", type=int, default=10_000, help="samples per figure")
    add_config_arguments(toy)
    data = sub.add_parser("data", help="input pipeline vs decode ceiling and a plain baseline")
    data.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    data.add_argument("--num-samples", type=int, default=8000, help="images per resolution")
    data.add_argument("--cores", type=int, default=2, help="Ray CPUs = DataLoader workers")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.bench == "toy":
            from pipeline.bench.toy import run_toy_benchmark

            run_toy_benchmark(resolve_config(args, defaults="toy"), args.num_samples)
        elif args.bench == "data":
            from pipeline.bench.data import run_data_benchmark

            run_data_benchmark(tuple(args.resolutions), args.num_samples, args.cores)
        return 0

    return run_job(body)


if __name__ == "__main__":
    sys.exit(main())
