"""The `lorajobs` command: runs the parts of the service and talks to a running one."""

import argparse
import sys

from cli import files, jobs, keys, models, plan, service, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorajobs", description="Managed LoRA and QLoRA fine-tuning.")
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


if __name__ == "__main__":
    sys.exit(main())
