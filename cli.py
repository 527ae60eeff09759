"""Operator CLI (SPEC R-OPS-1): ``python cli.py COMMAND ...``; ``--help`` lists the commands."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from db import db, init_db
from errors import EngineError
from settings import Settings, get_settings

log = logging.getLogger("cli")

Handler = Callable[[argparse.Namespace, Settings], int]
_COMMANDS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``func`` as the handler of sub-command ``name``."""
    def register(func: Handler) -> Handler:
        _COMMANDS[name] = (func, args, help)
        return func
    return register


@command("init-db", "create or upgrade the schema (idempotent)",
         lambda p: p.add_argument("--target", type=int, default=None, help="stop at this schema version"))
def cmd_init_db(args: argparse.Namespace, settings: Settings) -> int:
    from models.schema import LATEST, current_version, migrate

    with db.connection_context():
        applied = migrate(db, args.target)
        version = current_version(db)
    if applied:
        print(f"schema upgraded to version {version} (applied {', '.join(map(str, applied))})")
    else:
        print(f"schema already at version {version} (latest {LATEST}); nothing to do")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="cli.py", description="Campaign engine operator CLI")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, add_args, help_text) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, bind the database, run the command; errors print one clear line."""
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
        logging.basicConfig(level="DEBUG" if args.verbose else settings.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        init_db(settings, max_connections=4, application_name="campaign-cli")
        return _COMMANDS[args.command][0](args, settings)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
