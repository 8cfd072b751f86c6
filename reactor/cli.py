"""`reactor <command>`: argparse subcommands, kept thin.

Each command lives in `reactor/commands/<name>.py` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their command runs, so `reactor fds` does not pay for the gateway.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reactor import __version__
from reactor.errors import RuntimeFailure, UsageError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("reactor.commands.serve", "the seed's server: accept, then close/echo/discard"),
    "gateway": ("reactor.commands.gateway", "the load-balancing TCP gateway"),
    "demo": ("reactor.commands.demo", "the gateway with three demo backends on 127.0.0.1:8080"),
    "fds": ("reactor.commands.fds", "a process's fds joined with /proc/net/tcp rows"),
    "stats": ("reactor.commands.stats", "the live loop of a running gateway"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reactor", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"reactor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (modname, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=modname)
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            continue
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    mod = importlib.import_module(args._module)
    try:
        return int(mod.run(args) or 0)
    except (UsageError, RuntimeFailure) as e:
        print(f"reactor {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
