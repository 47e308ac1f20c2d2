"""The `lorajobs` command: runs the parts of the service and talks to a running one."""

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

import httpx

from cli import files, jobs, keys, models, plan, service, train
from cli.output import EXIT_FAILED, CliError, unreachable


def _version() -> str:
    try:
        return version("lorajobs")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorajobs", description="Managed LoRA and QLoRA fine-tuning.")
    parser.add_argument("--version", action="version", version=f"lorajobs {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (service, keys, files, jobs, models, train, plan):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        return 130
    except CliError as exc:
        print(f"lorajobs: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except httpx.TransportError as exc:  # a command that does not retry, or ran out of patience
        error = unreachable(getattr(args, "base_url", "the API"), exc)
        print(f"lorajobs: {error.message}", file=sys.stderr)
        return error.exit_code
    except httpx.HTTPError as exc:
        print(f"lorajobs: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
