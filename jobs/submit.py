"""fmpipe submit: run a fmpipe job on a Ray cluster (Jobs API), follow it, exit with its status.

  fmpipe submit <job> [job args...] [--address URL] [--no-wait] [--env NAME ...]

The job runs as `python -m jobs.<job> <job args>` in a copy of this repository (the Ray
runtime_env working_dir, without .venv/.git/local state). Options of submit itself may come
anywhere on the line; after a lone `--`, everything goes to the job.

Cluster: --address (the dashboard, http://<head>:8265), else RAY_API_SERVER_ADDRESS, else
RAY_ADDRESS. Token auth (Ray 2.60): the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token is sent when RAY_AUTH_MODE=token (or unset and a token exists); never printed.

Environment: MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3,
AWS_ENDPOINT_URL, AWS_REGION and AWS_DEFAULT_REGION go with the job when set here; --env NAME
adds another variable by name. Secrets never go (Ray shows a job's environment to everyone
holding the cluster token): --env refuses AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and any
*_SECRET*/*_PASSWORD*/*_TOKEN* variable. The cluster's nodes get credentials their own way:
their environment, an instance role or IRSA, or a Kubernetes Secret mounted as env vars by
secretKeyRef (infra/kuberay/raycluster.yaml, infra/README.md "Secrets").

Exit status: 0 when the job SUCCEEDED (or was submitted, with --no-wait); 1 when it FAILED
or was STOPPED (its error message is shown); 2 for a bad command line.

Examples:
  fmpipe submit prepare --source digits --out s3://data/digits --address http://127.0.0.1:8265
  fmpipe submit train --data s3://data/digits --workers 2 train.placement_strategy=STRICT_SPREAD
  fmpipe submit sample --model models:/digits@champion --num-samples 10000 --out s3://s/d --no-wait
  fmpipe submit retrain --config jobs/configs/retrain.yaml --no-wait
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

USAGE = "fmpipe submit <job> [job args...] [--address URL] [--no-wait] [--env NAME ...]"


@dataclass
class SubmitArgs:
    job: str
    job_args: list[str] = field(default_factory=list)
    address: str | None = None
    wait: bool = True
    env_names: list[str] = field(default_factory=list)
    python: str = "python"


def build_parser() -> argparse.ArgumentParser:
    """For --help only: the command line is split by :func:`parse` (job args pass through)."""
    parser = argparse.ArgumentParser(
        prog="fmpipe submit",
        usage=USAGE,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", help="the job to run: prepare, train, sample, retrain, ...")
    parser.add_argument("job_args", nargs="*", help="the job's own arguments, passed through")
    parser.add_argument("--address", metavar="URL", help="the Ray dashboard, http://<head>:8265")
    parser.add_argument("--no-wait", action="store_true", help="submit and return at once")
    parser.add_argument(
        "--env",
        metavar="NAME",
        action="append",
        default=[],
        help="carry this environment variable's value to the job, by name (repeatable); "
        "secret variables are refused",
    )
    parser.add_argument(
        "--python", metavar="EXE", default="python", help="Python on the cluster (default python)"
    )
    return parser


_VALUED = ("--address", "--env", "--python")


def parse(argv: list[str]) -> SubmitArgs:
    """Split ``argv`` into submit's options (anywhere before a lone ``--``) and the job's."""
    positional: list[str] = []
    parsed = SubmitArgs(job="")
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            positional.extend(argv[i + 1 :])
            break
        name, eq, value = token.partition("=")
        if name in _VALUED:
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            if name == "--address":
                parsed.address = value
            elif name == "--env":
                parsed.env_names.append(value)
            else:
                parsed.python = value
        elif token == "--no-wait":
            parsed.wait = False
        else:
            positional.append(token)
        i += 1
    if not positional:
        raise ValueError("no job given")
    parsed.job, parsed.job_args = positional[0], positional[1:]
    return parsed


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0 if args else 2
    try:
        parsed = parse(args)
    except ValueError as exc:
        print(f"usage: {USAGE}\nfmpipe submit: error: {exc}", file=sys.stderr)
        return 2
    # Imported here: `fmpipe submit --help` does not import Ray.
    from pipeline.redact import scrub
    from pipeline.submit import SubmitError, submit

    try:
        result = submit(
            parsed.job,
            parsed.job_args,
            address=parsed.address,
            env_names=parsed.env_names,
            wait=parsed.wait,
            python=parsed.python,
        )
    except SubmitError as exc:
        print(f"fmpipe submit: error: {scrub(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
