"""The `dsg` command's entry point: the command line (cli.py) imports torch and transformers, which takes seconds;
a Ctrl-C meanwhile, or while the command line builds its parser, exits with status 130 and one line, as it does once
a command runs."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from .cli import main as run

        return run()  # a Ctrl-C its own handling does not reach (while it builds the argument parser) lands here
    except KeyboardInterrupt:
        print("dsg: interrupted", file=sys.stderr)
        return 130
