"""``edgefleet bundle``: build, sign, inspect and verify OTA bundles."""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from edgefleet.console import console, emit, emit_error, kv_table, non_negative_int, positive_int
from edgefleet.errors import EdgefleetError
from edgefleet.keys import KeyFileError, load_signing_key
from edgefleet.manifest import DeviceFacts
from edgefleet.timeutil import format_utc, parse_utc, utcnow

__all__ = ["add_bundle_parser"]


def add_bundle_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``bundle build|sign|inspect|verify``."""
    bundle = sub.add_parser("bundle", help="build, sign, inspect and verify OTA bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", metavar="VERB", required=True)

    b = bsub.add_parser(
        "build",
        help="package a self-contained ONNX model into a signed bundle",
        description="Package MODEL.onnx. health_check.json, drift_reference.json, "
        "model_card.json and report.json found beside the model (as written by "
        "'edgefleet compress') go into the manifest.",
    )
    b.add_argument("model", type=Path, metavar="MODEL.onnx")
    b.add_argument("--name", required=True, help="model name (lowercase, digits, ._-)")
    b.add_argument(
        "--version", required=True, type=positive_int, help="integer, strictly increasing"
    )
    b.add_argument("--key", action="append", type=Path, default=[],
                   help="release private key; repeat for m-of-n (or --unsigned)")  # fmt: skip
    b.add_argument("--unsigned", action="store_true", help="build without signatures (sign later)")
    b.add_argument(
        "--device-class", action="append", default=[], help="allowed device class; repeatable"
    )
    b.add_argument(
        "--arch", action="append", default=[], help="allowed CPU arch (uname -m); repeatable"
    )
    b.add_argument(
        "--expires-in", type=positive_int, default=90, metavar="DAYS", help="lifetime (90)"
    )
    b.add_argument("--min-agent-version", default="0.1.0")
    b.add_argument(
        "--min-onnxruntime-version", default=None, help="default: from the model's opset"
    )
    b.add_argument("--compression", choices=("zstd", "none"), default="zstd")
    b.add_argument("--zstd-level", type=int, default=19, choices=range(1, 23), metavar="1-22")
    b.add_argument("--approver", default=None, help="who approved this release (lineage)")
    b.add_argument("--code-commit", default=None, help="training code commit (lineage)")
    b.add_argument("--training-data-sha256", default=None, help="training data digest (lineage)")
    b.add_argument("--out", required=True, type=Path, help="bundle file to write")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_run_build)

    s = bsub.add_parser("sign", help="add one or more release signatures to a bundle")
    s.add_argument("bundle", type=Path, metavar="FILE")
    s.add_argument("--key", action="append", type=Path, required=True, help="release private key")
    s.add_argument("--out", type=Path, default=None, help="write here instead of in place")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_run_sign)

    i = bsub.add_parser("inspect", help="show a bundle's manifest and signers (does not verify)")
    i.add_argument("bundle", type=Path, metavar="FILE")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_run_inspect)

    v = bsub.add_parser(
        "verify",
        help="verify signatures, hashes, expiry, target and rollback; exit 0 only if valid",
        description="Exit 0 when the bundle verifies; otherwise the error's code (docs/cli.md).",
    )
    v.add_argument("bundle", type=Path, metavar="FILE")
    v.add_argument("--trust-root", required=True, type=Path, help="trusted trust-root.json")
    v.add_argument("--device-class", default=None, help="check the target device class")
    v.add_argument("--arch", default=None, help="check the target CPU arch ('host' = this machine)")
    v.add_argument("--agent-version", default=None)
    v.add_argument("--onnxruntime-version", default=None)
    v.add_argument("--installed-version", type=non_negative_int, default=0,
                   help="version of this model already installed (rollback check)")  # fmt: skip
    v.add_argument(
        "--now", default=None, help="check expiry at this UTC time (YYYY-MM-DDTHH:MM:SSZ)"
    )
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=_run_verify)


def _fail(exc: Exception, as_json: bool) -> int:
    code = exc.code if isinstance(exc, EdgefleetError) else 1
    return emit_error(type(exc).__name__, code, str(exc), as_json)


def _run_build(args: argparse.Namespace) -> int:
    from edgefleet.build import BuildOptions, ModelFileError, build_bundle, load_compression_outputs

    if not args.key and not args.unsigned:
        return emit_error("UsageError", 2, "give --key (release key) or --unsigned", args.json)
    try:
        keys = [load_signing_key(p) for p in args.key]
        model = args.model.read_bytes()
        extra = load_compression_outputs(args.model.parent)
        lineage = {
            "training_data_sha256": args.training_data_sha256,
            "code_commit": args.code_commit,
            "compression_report_sha256": extra.get("report_sha256"),
            "approver": args.approver,
        }
        options = BuildOptions(
            name=args.name,
            version=args.version,
            expires_in=timedelta(days=args.expires_in),
            device_classes=tuple(args.device_class),
            archs=tuple(args.arch),
            min_agent_version=args.min_agent_version,
            min_onnxruntime_version=args.min_onnxruntime_version,
            compression=args.compression,
            zstd_level=args.zstd_level,
            health_check=extra.get("health_check", {}),
            drift_reference=extra.get("drift_reference"),
            lineage=lineage,
            model_card=extra.get("model_card", {}),
        )
        manifest = build_bundle(model, options, keys, args.out)
    except OSError as exc:
        return emit_error("FileError", 1, f"{exc.filename or ''}: {exc.strerror}", args.json)
    except (KeyFileError, ModelFileError, ValueError, EdgefleetError) as exc:
        return _fail(exc, args.json)
    entry = manifest.model_entry
    result = {
        "ok": True,
        "bundle": str(args.out),
        "bytes": args.out.stat().st_size,
        "model": manifest.name,
        "version": manifest.version,
        "manifest_sha256": hashlib.sha256(manifest.to_bytes()).hexdigest(),
        "signed_by": [k.keyid for k in keys],
        "compression": entry.compression,
        "model_bytes": entry.uncompressed_size,
        "stored_bytes": entry.size,
        "expires": format_utc(manifest.expires),
        "health_check": bool(manifest.health_check),
        "drift_reference": manifest.drift_reference is not None,
    }
    emit(result, args.json, lambda r: console.print(kv_table("bundle built", r)))
    return 0


def _run_sign(args: argparse.Namespace) -> int:
    from edgefleet.release import add_signatures

    out = args.out or args.bundle
    try:
        keys = [load_signing_key(p) for p in args.key]
        header = add_signatures(args.bundle, keys, out)
    except OSError as exc:
        return emit_error("FileError", 1, f"{exc.filename or ''}: {exc.strerror}", args.json)
    except (KeyFileError, EdgefleetError) as exc:
        return _fail(exc, args.json)
    result = {
        "ok": True,
        "bundle": str(out),
        "added": [k.keyid for k in keys],
        "signatures": [s.keyid for s in header.signatures],
    }
    emit(result, args.json, lambda r: console.print(kv_table("bundle signed", r)))
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from edgefleet.trust import read_header

    try:
        with open(args.bundle, "rb") as fh:
            header = read_header(fh)
        manifest = header.manifest()
    except OSError as exc:
        return emit_error("FileError", 1, f"{exc.filename or ''}: {exc.strerror}", args.json)
    except EdgefleetError as exc:
        return _fail(exc, args.json)
    result = {
        "ok": True,
        "verified": False,
        "bundle": str(args.bundle),
        "bytes": os.path.getsize(args.bundle),
        "manifest_sha256": header.manifest_sha256,
        "signatures": [s.keyid for s in header.signatures],
        "manifest": manifest.to_dict(),
    }
    emit(result, args.json, _render_inspect)
    return 0


def _render_inspect(result: Mapping[str, Any]) -> None:
    m = result["manifest"]
    t = m["targets"]
    rows: dict[str, Any] = {
        "model": f"{m['model']['name']} v{m['model']['version']}",
        "created / expires": f"{m['created']} / {m['expires']}",
        "device classes": ", ".join(t["device_classes"]) or "any",
        "archs": ", ".join(t["archs"]) or "any",
        "needs": f"agent >= {t['min_agent_version']}, onnxruntime >= "
        f"{t['min_onnxruntime_version']}, opset {t['opset']}",
        "inputs": "; ".join(f"{x['name']} {x['dtype']}{x['shape']}" for x in m["io"]["inputs"]),
        "outputs": "; ".join(f"{x['name']} {x['dtype']}{x['shape']}" for x in m["io"]["outputs"]),
        "health check": "yes" if m["health_check"] else "none",
        "drift reference": "yes" if m["drift_reference"] else "none",
        "manifest sha256": result["manifest_sha256"],
        "signed by": ", ".join(k[:16] for k in result["signatures"]) or "(unsigned)",
    }
    for p in m["payload"]:
        rows[f"payload {p['path']}"] = (
            f"{p['size']} B stored ({p['compression']}), {p['uncompressed_size']} B model, "
            f"sha256 {p['sha256'][:16]}"
        )
    for key, val in m["lineage"].items():
        if val:
            rows[f"lineage {key}"] = val
    console.print(kv_table(f"{result['bundle']} (not verified: use 'bundle verify')", rows))


def _run_verify(args: argparse.Namespace) -> int:
    from edgefleet.trust import TrustRoot, verify_bundle

    try:
        now = parse_utc(args.now) if args.now else utcnow()
    except ValueError as exc:
        return emit_error("UsageError", 2, str(exc), args.json)
    try:
        trust_root = TrustRoot.from_bytes(args.trust_root.read_bytes())
        trust_root.check_self_signed()
        with open(args.bundle, "rb") as fh:
            header_name = _peek_name(fh)
            fh.seek(0)
            device = DeviceFacts(
                device_class=args.device_class,
                arch=platform.machine() if args.arch == "host" else args.arch,
                agent_version=args.agent_version,
                onnxruntime_version=args.onnxruntime_version,
            )
            installed = {header_name: args.installed_version} if header_name else {}
            verified = verify_bundle(
                fh, trust_root=trust_root, device=device, installed=installed, now=now
            )
    except OSError as exc:
        return emit_error("FileError", 1, f"{exc.filename or ''}: {exc.strerror}", args.json)
    except EdgefleetError as exc:
        return _fail(exc, args.json)
    m = verified.manifest
    result = {
        "ok": True,
        "verified": True,
        "bundle": str(args.bundle),
        "model": m.name,
        "version": m.version,
        "manifest_sha256": verified.manifest_sha256,
        "signed_by": sorted(verified.signed_by),
        "trust_root_version": trust_root.version,
        "expires": format_utc(m.expires),
        "payload": [p.to_dict() for p in m.payload],
    }
    emit(
        result,
        args.json,
        lambda r: console.print(
            f"[bold green]verified[/] {r['model']} v{r['version']} "
            f"(manifest {r['manifest_sha256'][:16]}, signed by "
            f"{', '.join(k[:12] for k in r['signed_by'])}, trust root v{r['trust_root_version']})"
        ),
    )
    return 0


def _peek_name(fh: Any) -> str | None:
    """The model name from the (unverified) manifest, to key the rollback floor."""
    from edgefleet.trust import read_header

    try:
        return read_header(fh).manifest().name
    except EdgefleetError:
        return None  # verify_bundle reports the precise error
