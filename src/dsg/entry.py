"""The `dsg` command's entry point: the command line (cli.py) imports torch and transformers, which takes seconds;
a Ctrl-C meanwhile exits with status 130 and one line, as it does once a command runs."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("dsg: interrupted", file=sys.stderr)
        return 130
    return run()
