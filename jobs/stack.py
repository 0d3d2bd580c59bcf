"""fmpipe stack: the local stack on 127.0.0.1: SeaweedFS (S3), an MLflow server, a Ray head.

  fmpipe stack up      start what is not running (a running stack is left alone)
  fmpipe stack status  check each service live; print the addresses and the environment
  fmpipe stack env     print `export` lines for a shell, the S3 keys included
  fmpipe stack down    stop everything; the data, the runs and the ports stay for next time

Everything lives under <home>/stack (home: --home, $FMPIPE_HOME, or ./.fmpipe): S3 data in
s3/ (bucket `fmpipe`), MLflow's sqlite file mlflow.db with artifacts in
s3://fmpipe/mlartifacts, the S3 keys (credentials) and the Ray token (ray_auth_token),
generated once, mode 0600, and state.json (pids, ports). The Ray head runs with token
authentication (RAY_AUTH_MODE=token) and its dashboard and Jobs API on 127.0.0.1.

Use it from a shell with `source <home>/stack/env.sh`, then e.g.
  ray job submit --working-dir . -- python -m jobs.prepare --out s3://fmpipe/data/digits

Exit status: 0 on success (status: every service live), 1 when something is not running or
failed to start, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.home import stack_home


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home",
        metavar="DIR",
        help="fmpipe home; the stack lives in DIR/stack (default $FMPIPE_HOME or ./.fmpipe)",
    )
    parser = argparse.ArgumentParser(
        prog="fmpipe stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="{up,down,status,env}")
    up = sub.add_parser("up", parents=[common], help="start the stack (idempotent)")
    up.add_argument(
        "--s3-port", type=int, metavar="P", help="S3 port (default: last time's if free, else any)"
    )
    up.add_argument("--mlflow-port", type=int, metavar="P", help="MLflow server port (ditto)")
    up.add_argument("--ray-port", type=int, metavar="P", help="Ray GCS port (ditto)")
    up.add_argument(
        "--dashboard-port", type=int, metavar="P", help="Ray dashboard / Jobs API port (ditto)"
    )
    up.add_argument(
        "--num-cpus", type=int, metavar="N", help="CPUs the Ray head offers (default: all)"
    )
    sub.add_parser("down", parents=[common], help="stop the stack; data is kept")
    status = sub.add_parser("status", parents=[common], help="check each service live")
    status.add_argument("--json", action="store_true", help="machine-readable (no secrets)")
    sub.add_parser("env", parents=[common], help="print export lines (S3 keys included)")
    return parser


def _home(args: argparse.Namespace) -> Path:
    return stack_home(args.home)


def _print_status(stack, statuses) -> None:
    width = max(len(s.label) for s in statuses)
    for s in statuses:
        state = "live" if s.live else "DOWN"
        pid = f"pid {s.pid}" if s.pid else "-"
        print(f"  {s.label:<{width}}  {state:<4}  {s.address or '-':<24} {pid:<10} {s.detail}")
    if any(s.live for s in statuses):
        env = stack.client_env()
        print("\nEnvironment (S3 keys not shown):")
        print(f"  source {stack.env_path}")
        print("which exports:")
        for name, value in env.items():
            print(f"  {name}={value}")
        print("  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (from the credentials file)")


def _check_ports(args: argparse.Namespace) -> str | None:
    for flag in ("s3_port", "mlflow_port", "ray_port", "dashboard_port"):
        value = getattr(args, flag, None)
        if value is not None and not 1 <= value <= 65535:
            return f"--{flag.replace('_', '-')} must be a port number 1-65535, got {value}"
    num_cpus = getattr(args, "num_cpus", None)
    if num_cpus is not None and num_cpus < 1:
        return f"--num-cpus must be at least 1, got {num_cpus}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check_ports(args)
    if problem:
        parser.error(problem)

    from pipeline.stack import Stack, StackError

    stack = Stack(
        _home(args),
        s3_port=getattr(args, "s3_port", None),
        mlflow_port=getattr(args, "mlflow_port", None),
        ray_port=getattr(args, "ray_port", None),
        dashboard_port=getattr(args, "dashboard_port", None),
        num_cpus=getattr(args, "num_cpus", None),
    )
    try:
        if args.action == "up":
            statuses = stack.up()
            print(f"fmpipe stack: up ({stack.dir})")
            _print_status(stack, statuses)
            return 0 if all(s.live for s in statuses) else 1
        if args.action == "down":
            stopped = stack.down()
            if stopped:
                print(f"fmpipe stack: stopped {', '.join(stopped)}; data kept in {stack.dir}")
            else:
                print(f"fmpipe stack: not running ({stack.dir})")
            return 0
        if args.action == "status":
            statuses = stack.status()
            if args.json:
                print(
                    json.dumps(
                        {
                            "stack_dir": str(stack.dir),
                            "env_sh": str(stack.env_path),
                            "services": [s.to_dict() for s in statuses],
                            "env": stack.client_env() if any(s.live for s in statuses) else {},
                        },
                        indent=2,
                    )
                )
            else:
                print(f"fmpipe stack: {stack.dir}")
                _print_status(stack, statuses)
            return 0 if all(s.live for s in statuses) else 1
        if args.action == "env":
            if not any(s.live for s in stack.status()):
                print(f"fmpipe stack: not running ({stack.dir})", file=sys.stderr)
                return 1
            for name, value in stack.client_env(secrets_too=True).items():
                print(f"export {name}={_quote(value)}")
            return 0
    except StackError as exc:
        print(f"fmpipe stack: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fmpipe stack: interrupted", file=sys.stderr)
        return 130
    return 2


def _quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


if __name__ == "__main__":
    sys.exit(main())
