"""Fixtures for the wire-contract tests: a key directory, a tiny model, bundle crafting.

``craft_bundle`` writes bundles *below* the builder's checks, so attack tests
can produce exactly the malicious-but-signed bytes an attacker with (or
without) a key could produce.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import zstandard

from edgefleet import canonical
from edgefleet.build import BuildOptions, build_bundle
from edgefleet.keys import SigningKey, load_signing_key
from edgefleet.keystore import KeyStore
from edgefleet.manifest import DeviceFacts, PayloadEntry
from edgefleet.release import sign_manifest, tar_header, write_bundle
from edgefleet.trust import Signature, TrustRoot
from firmware_sim.models import linear_model as make_linear_model

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
DEVICE = DeviceFacts(
    device_class="pi4", arch="aarch64", agent_version="0.1.0", onnxruntime_version="1.17.0"
)


@pytest.fixture(scope="session")
def tiny_model() -> bytes:
    return make_linear_model(features=8, classes=3, seed=1)


@pytest.fixture
def keydir(tmp_path: Path) -> KeyStore:
    store = KeyStore(tmp_path / "keys")
    store.init(now=NOW - timedelta(days=1))
    return store


def release_key(store: KeyStore, n: int = 1) -> SigningKey:
    return load_signing_key(store.dir / f"release-{n}.key")


@pytest.fixture
def trust_root(keydir: KeyStore) -> TrustRoot:
    return keydir.trust_root()


@pytest.fixture
def build(keydir: KeyStore, tiny_model: bytes, tmp_path: Path) -> Callable[..., bytes]:
    """Build a genuine bundle with the builder; return its bytes."""

    def _build(
        *, version: int = 2, keys: Sequence[SigningKey] | None = None, name: str = "tiny", **kw: Any
    ) -> bytes:
        opts = BuildOptions(name=name, version=version, device_classes=("pi4",), **kw)
        out = tmp_path / f"{name}-{version}.bundle"
        signers = [release_key(keydir)] if keys is None else list(keys)
        build_bundle(tiny_model, opts, signers, out, now=NOW - timedelta(hours=1))
        return out.read_bytes()

    return _build


def manifest_dict(
    model: bytes,
    *,
    stored: bytes | None = None,
    compression: str = "none",
    path: str = "model.onnx",
    name: str = "tiny",
    version: int = 2,
    size: int | None = None,
    uncompressed_size: int | None = None,
    created: datetime = NOW - timedelta(hours=1),
    expires: datetime = NOW + timedelta(days=30),
    device_classes: Sequence[str] = ("pi4",),
) -> dict[str, Any]:
    """A manifest as an attacker or a buggy signer might write it (no validation)."""
    stored = model if stored is None else stored
    entry = {
        "path": path,
        "size": len(stored) if size is None else size,
        "sha256": hashlib.sha256(stored).hexdigest(),
        "compression": compression,
        "uncompressed_size": len(model) if uncompressed_size is None else uncompressed_size,
        "uncompressed_sha256": hashlib.sha256(model).hexdigest(),
    }
    return {
        "format_version": 1,
        "model": {"name": name, "version": version},
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "expires": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "targets": {
            "device_classes": list(device_classes),
            "archs": [],
            "min_agent_version": "0.1.0",
            "min_onnxruntime_version": "1.12.0",
            "opset": 17,
        },
        "payload": [entry],
        "io": {
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}],
            "outputs": [{"name": "probs", "dtype": "float32", "shape": ["batch", 3]}],
        },
        "health_check": {},
        "drift_reference": None,
        "lineage": {},
        "model_card": {},
    }


def craft_bundle(
    manifest: dict[str, Any],
    payload: bytes,
    keys: Sequence[SigningKey],
    *,
    extra_sigs: Sequence[Signature] = (),
    member_name: str | None = None,
) -> bytes:
    """Sign ``manifest`` as given and write it with ``payload`` as the one payload member."""
    manifest_bytes = canonical.encode(manifest)
    sigs = sign_manifest(manifest_bytes, keys) + list(extra_sigs)
    entry_d = manifest["payload"][0]
    entry = PayloadEntry(
        path=member_name or entry_d["path"],
        size=len(payload),
        sha256="0" * 64,
        compression="none",
        uncompressed_size=len(payload),
        uncompressed_sha256="0" * 64,
    )
    buf = io.BytesIO()
    write_bundle(buf, manifest_bytes, sigs, [(entry, io.BytesIO(payload))])
    return buf.getvalue()


def members(data: bytes) -> list[tuple[str, int, int]]:
    """(name, header offset, size) of each member, for surgical edits in tests."""
    out = []
    off = 0
    while off + 512 <= len(data) and data[off : off + 512] != bytes(512):
        name = data[off : off + 100].rstrip(b"\0").decode()
        size = int(data[off + 124 : off + 135], 8)
        out.append((name, off, size))
        off += 512 + size + (-size % 512)
    return out


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


__all__ = [
    "DEVICE",
    "NOW",
    "craft_bundle",
    "manifest_dict",
    "members",
    "release_key",
    "tar_header",
    "zstd",
]
