"""A bundle verifies with standard tools alone: tar, sha256sum, base64 and openssl.

This test follows docs/bundle-format.md step by step ("Verifying by hand") and
uses Python only to read JSON fields, never for a hash or a signature.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from edgefleet.cli import main

TOOLS = ("tar", "sha256sum", "openssl", "base64", "zstd")


def sh(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, check=check, capture_output=True, text=True)


def test_tools_present():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"install {missing} (make test installs them on Debian)"


def openssl_verify(work: Path) -> subprocess.CompletedProcess[str]:
    """Step 2 of the hand check: Ed25519 over manifest.json's raw bytes."""
    args = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "key.der", "-keyform", "DER"]
    args += ["-rawin", "-in", "manifest.json", "-sigfile", "sig.bin"]
    return sh(*args, cwd=work, check=False)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_bundle_verifies_with_sha256sum_and_openssl(tmp_path, keydir, compression):
    model = tmp_path / "model.onnx"
    from firmware_sim.models import linear_model as make_linear_model

    model.write_bytes(make_linear_model())
    bundle = tmp_path / "tiny.bundle"
    assert (
        main(
            [
                "bundle",
                "build",
                str(model),
                "--name",
                "tiny",
                "--version",
                "4",
                "--key",
                str(keydir.dir / "release-1.key"),
                "--compression",
                compression,
                "--out",
                str(bundle),
                "--json",
            ]
        )
        == 0
    )
    work = tmp_path / "x"
    work.mkdir()
    # 1. Unpack: an ordinary ustar archive.
    listing = sh("tar", "-tf", str(bundle), cwd=work).stdout.split()
    assert listing == ["manifest.json", "signatures.json", "payload/model.onnx"]
    sh("tar", "-xf", str(bundle), cwd=work)
    # 2. The release key's public key from the trust root; its id is sha256 of the DER.
    root = json.loads((keydir.dir / "trust-root.json").read_text())
    sigs = json.loads((work / "signatures.json").read_text())["signatures"]
    assert len(sigs) == 1
    keyid = sigs[0]["keyid"]
    assert keyid in root["signed"]["roles"]["release"]["keyids"]
    (work / "key.b64").write_text(root["signed"]["keys"][keyid]["public"])
    sh("sh", "-c", "base64 -d key.b64 > key.der", cwd=work)
    assert sh("sha256sum", "key.der", cwd=work).stdout.split()[0] == keyid
    # 3. The signature covers manifest.json's bytes exactly as stored.
    (work / "sig.b64").write_text(sigs[0]["sig"])
    sh("sh", "-c", "base64 -d sig.b64 > sig.bin", cwd=work)
    ok = openssl_verify(work)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Signature Verified Successfully" in ok.stdout
    # 4. The manifest covers the payload by hash and size.
    entry = json.loads((work / "manifest.json").read_text())["payload"][0]
    member = work / "payload" / entry["path"]
    assert member.stat().st_size == entry["size"]
    assert sh("sha256sum", str(member), cwd=work).stdout.split()[0] == entry["sha256"]
    if entry["compression"] == "zstd":
        sh("zstd", "-q", "-d", str(member), "-o", "model.onnx", cwd=work)
        decoded = work / "model.onnx"
    else:
        decoded = member
    assert decoded.stat().st_size == entry["uncompressed_size"]
    assert sh("sha256sum", str(decoded), cwd=work).stdout.split()[0] == entry["uncompressed_sha256"]
    # 5. A tampered manifest fails openssl too.
    (work / "manifest.json").write_bytes(
        (work / "manifest.json").read_bytes().replace(b'"version":4', b'"version":5')
    )
    bad = openssl_verify(work)
    assert bad.returncode != 0
