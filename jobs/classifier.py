"""fmpipe classifier: train the classifier that `fmpipe eval` scores samples with.

A small CNN learns the labelled train split of --data (decoded exactly as training decodes
it), is checked on the held-out val split, stored under
train.storage_path/classifiers/ and registered in MLflow as <dataset>-classifier with the
alias champion, beside the generator. Its penultimate features give an in-domain Fréchet
distance; its predictions, the conditional accuracy of a class-conditional model's samples.
Seeded by `seed`: the same config and data give the same classifier.

Examples:
  fmpipe classifier                        # the demo's digits ($FMPIPE_HOME/store/digits)
  fmpipe classifier --data s3://datasets/digits eval.classifier_epochs=40
"""

from __future__ import annotations

import argparse
import sys

from jobs._common import add_config_arguments, parse_job_args, resolve_config, run_guarded, run_job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmpipe classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", metavar="URI", help="a labelled dataset (data.uri)")
    parser.add_argument(
        "--epochs", type=int, metavar="E", help="training epochs (eval.classifier_epochs)"
    )
    add_config_arguments(parser)
    return parser


SHORTCUTS = {"data": "data.uri", "epochs": "eval.classifier_epochs"}


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args(build_parser(), argv)

    def body() -> int:
        cfg = resolve_config(args, "train", shortcuts=SHORTCUTS)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        from pipeline.eval.classifier_job import fit_classifier
        from pipeline.home import data_uri

        cfg.data.uri = data_uri(cfg)

        def action() -> None:
            for line in fit_classifier(cfg).summary_lines():
                print(line)

        return run_guarded("classifier", action, "re-run the same command")

    return run_job(body, "classifier")


if __name__ == "__main__":
    sys.exit(main())
