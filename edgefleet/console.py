"""Output for CLI verbs: one JSON object for machines, rich text for people.

Every verb builds a plain dict result; ``emit`` prints it as a single JSON
object (``--json``) or hands it to a renderer that prints tables. Errors go the
same way through ``emit_error`` so scripts can always parse stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["console", "emit", "emit_error", "kv_table", "non_negative_int", "positive_int"]

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def emit(
    result: Mapping[str, Any], as_json: bool, render: Callable[[Mapping[str, Any]], None]
) -> None:
    """Print ``result`` as JSON or through ``render``."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=None, sort_keys=True, default=str) + "\n")
    else:
        render(result)


def emit_error(name: str, code: int, message: str, as_json: bool, **extra: Any) -> int:
    """Report an error; return ``code`` for the process exit status."""
    if as_json:
        payload = {"ok": False, "error": name, "code": code, "message": message, **extra}
        sys.stdout.write(json.dumps(payload, sort_keys=True, default=str) + "\n")
    else:
        err_console.print(f"[bold red]{name}[/]: {message}")
    return code


def kv_table(title: str, rows: Mapping[str, Any]) -> Table:
    """A two-column key/value table."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(str(key), str(value))
    return table


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value
