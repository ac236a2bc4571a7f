"""``edgefleet keys``: create, rotate and revoke the keys of a trust root."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from edgefleet.console import console, emit, emit_error, non_negative_int, positive_int
from edgefleet.errors import EdgefleetError
from edgefleet.keys import KeyFileError
from edgefleet.keystore import KeyStore, KeyStoreError
from edgefleet.trust import TrustRoot

__all__ = ["add_keys_parser"]


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``keys init|rotate|revoke|show``."""
    keys = sub.add_parser("keys", help="manage root, release and director keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="VERB", required=True)

    init = ksub.add_parser("init", help="create keys and trust root v1 in a new directory")
    init.add_argument("--dir", required=True, type=Path, help="key directory (must hold no keys)")
    init.add_argument("--root-keys", type=positive_int, default=1, help="number of root keys (1)")
    init.add_argument(
        "--root-threshold", type=positive_int, default=1, help="root signatures needed (1)"
    )
    init.add_argument(
        "--release-keys", type=positive_int, default=1, help="number of release keys (1)"
    )
    init.add_argument(
        "--release-threshold",
        type=positive_int,
        default=1,
        help="release signatures per bundle (1)",
    )
    init.add_argument("--expires-in", type=positive_int, default=3650, metavar="DAYS",
                      help="trust root lifetime in days (3650)")  # fmt: skip
    init.add_argument("--json", action="store_true", help="print one JSON object")
    init.set_defaults(func=_run_init)

    rot = ksub.add_parser(
        "rotate",
        help="publish the next trust root version (add keys, remove keys, change thresholds)",
    )
    rot.add_argument("--dir", required=True, type=Path)
    for role in ("root", "release", "director"):
        rot.add_argument(f"--add-{role}", type=non_negative_int, default=0, metavar="N",
                         help=f"generate N new {role} keys")  # fmt: skip
        rot.add_argument(f"--{role}-threshold", type=positive_int, default=None, metavar="M",
                         help=f"new {role} threshold")  # fmt: skip
    rot.add_argument("--remove", action="append", default=[], metavar="KEYID",
                     help="drop a key (id or 8+ digit prefix); repeatable")  # fmt: skip
    rot.add_argument("--expires-in", type=positive_int, default=3650, metavar="DAYS")
    rot.add_argument("--json", action="store_true")
    rot.set_defaults(func=_run_rotate)

    rev = ksub.add_parser(
        "revoke", help="remove a (compromised) key: publishes the next trust root without it"
    )
    rev.add_argument("keyid", help="key id or a prefix of at least 8 hex digits")
    rev.add_argument("--dir", required=True, type=Path)
    for role in ("root", "release", "director"):
        rev.add_argument(f"--{role}-threshold", type=positive_int, default=None, metavar="M",
                         help=f"new {role} threshold if the old one is unreachable")  # fmt: skip
    rev.add_argument("--expires-in", type=positive_int, default=3650, metavar="DAYS")
    rev.add_argument("--json", action="store_true")
    rev.set_defaults(func=_run_revoke)

    show = ksub.add_parser("show", help="show the current trust root: roles, keys, thresholds")
    show.add_argument("--dir", required=True, type=Path)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_run_show)


def _describe(store: KeyStore, root: TrustRoot) -> dict[str, Any]:
    files = {kf.keyid: str(kf.path) for kf in store.key_files()}
    return {
        "ok": True,
        "trust_root": str(store.trust_root_path),
        "version": root.version,
        "expires": root.signed["expires"],
        "roles": {
            name: {
                "threshold": role.threshold,
                "keys": [{"keyid": kid, "file": files.get(kid)} for kid in role.keyids],
            }
            for name, role in root.roles.items()
        },
    }


def _render(result: Mapping[str, Any]) -> None:
    from rich.table import Table

    table = Table(
        title=f"trust root v{result['version']} (expires {result['expires']}) "
        f"-> {result['trust_root']}",
        title_justify="left",
    )
    for col in ("role", "threshold", "key id", "private key file"):
        table.add_column(col)
    for name, role in result["roles"].items():
        for i, key in enumerate(role["keys"]):
            table.add_row(
                name if i == 0 else "",
                f"{role['threshold']}-of-{len(role['keys'])}" if i == 0 else "",
                key["keyid"][:16],
                key["file"] or "(not in this directory)",
            )
    console.print(table)


def _guard(args: argparse.Namespace, action: Any) -> int:
    try:
        store = KeyStore(args.dir)
        root = action(store)
    except (KeyStoreError, KeyFileError) as exc:
        return emit_error(type(exc).__name__, 1, str(exc), args.json)
    except EdgefleetError as exc:
        return emit_error(type(exc).__name__, exc.code, str(exc), args.json)
    emit(_describe(store, root), args.json, _render)
    return 0


def _thresholds(args: argparse.Namespace) -> dict[str, int]:
    return {
        role: getattr(args, f"{role}_threshold")
        for role in ("root", "release", "director")
        if getattr(args, f"{role}_threshold") is not None
    }


def _run_init(args: argparse.Namespace) -> int:
    return _guard(
        args,
        lambda store: store.init(
            root_keys=args.root_keys,
            root_threshold=args.root_threshold,
            release_keys=args.release_keys,
            release_threshold=args.release_threshold,
            expires_in=timedelta(days=args.expires_in),
        ),
    )


def _run_rotate(args: argparse.Namespace) -> int:
    add = {r: getattr(args, f"add_{r}") for r in ("root", "release", "director")}
    return _guard(
        args,
        lambda store: store.rotate(
            add={r: n for r, n in add.items() if n},
            remove=args.remove,
            thresholds=_thresholds(args),
            expires_in=timedelta(days=args.expires_in),
        ),
    )


def _run_revoke(args: argparse.Namespace) -> int:
    return _guard(
        args,
        lambda store: store.rotate(
            remove=[args.keyid],
            thresholds=_thresholds(args),
            expires_in=timedelta(days=args.expires_in),
        ),
    )


def _run_show(args: argparse.Namespace) -> int:
    return _guard(args, lambda store: store.trust_root())
