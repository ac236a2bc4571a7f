"""The ``edgefleet`` command: one entry point, verbs grouped by subsystem.

``keys`` and ``bundle`` live here (they only need the wire contract). The
other groups are registered from their packages (``compression.cli``,
``agent.cli``, ``server.cli``) through an ``add_parser(subparsers)`` hook whose
module imports nothing heavy; their handlers import torch, onnxruntime or
FastAPI only when run, so ``edgefleet --help`` stays fast and the agent's
install never needs server packages.

Exit status: 0 success; 1 a usable-input problem (missing file, bad key file,
bad option value); 2 command-line usage; 10-26 a verification error (the
error's ``code``, see docs/cli.md); 40-48 a model refused by the device's
health check; 30 a transport error, 31 a storage error; 50-59 agent errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from edgefleet import __version__
from edgefleet.cli_bundle import add_bundle_parser
from edgefleet.cli_keys import add_keys_parser

__all__ = ["build_parser", "main"]

# Subsystems that contribute verbs; each module exposes add_parser(subparsers).
_PLUGINS = ("compression.cli", "agent.cli", "server.cli")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by ``main`` and by docs tests)."""
    parser = argparse.ArgumentParser(
        prog="edgefleet",
        description="Signed OTA delivery of compressed ML models to edge devices.",
    )
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_keys_parser(sub)
    add_bundle_parser(sub)
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # subsystem not present in this checkout
            raise
        hook = getattr(module, "add_parser", None)
        if hook is not None:
            hook(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
