"""The `a2v` command: `a2v up|down|status` run the local stack (the job commands come with issue 7)."""

from __future__ import annotations

import argparse
import sys

from deploy import local


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="a2v", description="audio2video: audio-driven lip sync")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the local stack (object store and every service)")
    commands.add_parser("down", help="stop the local stack")
    commands.add_parser("status", help="show each component of the local stack and its health")
    args = parser.parse_args(argv)
    return local.main([args.command])


if __name__ == "__main__":
    sys.exit(main())
