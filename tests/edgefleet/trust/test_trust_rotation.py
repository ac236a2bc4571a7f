"""Key rotation: 1-of-1 -> 2-of-3 -> revoke one key -> the revoked key's bundles fail.

The table walks one key directory through its history; after each step a
device that only pinned v1 follows the published chain and judges bundles.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from edgefleet import canonical
from edgefleet.errors import (
    ExpiredError,
    RollbackError,
    ThresholdNotMetError,
    UnknownKeyError,
    VerificationError,
)
from edgefleet.keys import generate
from edgefleet.keystore import KeyStore, KeyStoreError
from edgefleet.trust import TRUST_ROOT_TYPE, TrustRoot, sign_trust_root, verify_bundle
from tests.edgefleet.bundlekit import DEVICE, NOW, craft_bundle, manifest_dict, release_key

MODEL = b"not really onnx, the verifier does not care" * 4

# step, action, then (signers by release-key number, expected outcome)
TABLE = [
    ("1-of-1", None, [((1,), "ok"), ((), "threshold")]),
    (
        "2-of-3",
        {"add": {"release": 2}, "thresholds": {"release": 2}},
        [((1,), "threshold"), ((1, 2), "ok"), ((2, 3), "ok"), ((1, 1), "threshold")],
    ),
    (
        "revoke release-2",
        {"remove": "release-2", "thresholds": {"release": 2}},
        [((2,), "unknown"), ((1, 2), "threshold"), ((1, 3), "ok"), ((3,), "threshold")],
    ),
]
OUTCOME = {"threshold": ThresholdNotMetError, "unknown": UnknownKeyError}


def test_key_rotation_table(tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.init(now=NOW - timedelta(days=1))
    pinned = store.trust_root()  # what the device trusted at enrolment
    keys_by_number = {1: release_key(store, 1)}
    for step, action, cases in TABLE:
        if action is not None:
            remove = []
            if "remove" in action:
                target = keys_by_number[int(action["remove"].split("-")[1])]
                remove = [target.keyid[:12]]
            store.rotate(
                add=action.get("add"),
                remove=remove,
                thresholds=action.get("thresholds"),
                now=NOW - timedelta(hours=2),
            )
            for n in (2, 3):
                path = store.dir / f"release-{n}.key"
                if path.exists():
                    keys_by_number[n] = release_key(store, n)
        device_root = pinned.update_chain(store.chain_since(pinned.version), NOW)
        assert device_root.version == store.trust_root().version, step
        for signers, expected in cases:
            data = craft_bundle(manifest_dict(MODEL), MODEL, [keys_by_number[n] for n in signers])
            if expected == "ok":
                verify_bundle(data, trust_root=device_root, device=DEVICE, installed={}, now=NOW)
            else:
                with pytest.raises(OUTCOME[expected]):
                    verify_bundle(
                        data, trust_root=device_root, device=DEVICE, installed={}, now=NOW
                    )
    assert (store.dir / "revoked" / "release-2.key").exists()


def test_trust_root_forged_successor_rejected(tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.init(now=NOW - timedelta(days=1))
    v1 = store.trust_root()
    attacker = generate()
    signed = dict(v1.signed)
    signed["version"] = 2
    signed["keys"] = {
        **signed["keys"],
        attacker.keyid: {"keytype": "ed25519", "public": attacker.public.to_b64()},
    }
    signed["roles"] = {**signed["roles"], "root": {"keyids": [attacker.keyid], "threshold": 1}}
    forged = sign_trust_root(signed, [attacker])
    with pytest.raises(UnknownKeyError):
        v1.verify_successor(canonical.encode(forged.to_dict()))


def test_trust_root_new_root_keys_must_also_sign(tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.init(now=NOW - timedelta(days=1))
    v1 = store.trust_root()
    old_root = store.signing_keys(v1.role("root").keyids)
    newcomer = generate()
    signed = dict(v1.signed)
    signed["version"] = 2
    signed["keys"] = {
        **signed["keys"],
        newcomer.keyid: {"keytype": "ed25519", "public": newcomer.public.to_b64()},
    }
    signed["roles"] = {**signed["roles"], "root": {"keyids": [newcomer.keyid], "threshold": 1}}
    only_old = sign_trust_root(signed, old_root)
    with pytest.raises(UnknownKeyError):
        v1.verify_successor(canonical.encode(only_old.to_dict()))
    both = sign_trust_root(signed, [*old_root, newcomer])
    assert v1.verify_successor(canonical.encode(both.to_dict())).version == 2


def test_trust_root_rollback_and_skip_rejected(tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.init(now=NOW - timedelta(days=1))
    v1_bytes = store.trust_root_path.read_bytes()
    store.rotate(add={"release": 1}, now=NOW)
    store.rotate(add={"release": 1}, now=NOW)
    v1 = TrustRoot.from_bytes(v1_bytes)
    v3 = store.trust_root()
    with pytest.raises(RollbackError):
        v3.verify_successor(v1_bytes)
    with pytest.raises(VerificationError, match="skips"):
        v1.verify_successor(store.trust_root_path.read_bytes())
    assert v1.update_chain(store.chain_since(1), NOW).version == 3


def test_trust_root_expired_final_root_rejected(tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.init(now=NOW - timedelta(days=1))
    v1 = store.trust_root()
    store.rotate(add={"release": 1}, expires_in=timedelta(days=1), now=NOW - timedelta(days=1))
    with pytest.raises(ExpiredError):
        v1.update_chain(store.chain_since(1), NOW + timedelta(days=1))


def test_keystore_rotate_refuses_unreachable_threshold(tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.init(release_keys=2, release_threshold=2, now=NOW)
    victim = store.trust_root().role("release").keyids[0]
    before = store.trust_root_path.read_bytes()
    with pytest.raises(KeyStoreError, match="threshold"):
        store.rotate(remove=[victim[:10]], now=NOW)
    assert store.trust_root_path.read_bytes() == before  # nothing published


def test_keystore_init_refuses_existing_directory(tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.init(now=NOW)
    with pytest.raises(KeyStoreError, match="already holds keys"):
        store.init(now=NOW)


def test_trust_root_document_structure_errors():
    from edgefleet.trust import MalformedTrustRootError

    for bad in (b"[]", b"{}", b'{"signed": {"_type": "x"}, "signatures": []}', b"\xff"):
        with pytest.raises(MalformedTrustRootError):
            TrustRoot.from_bytes(bad)
    key = generate()
    body = {
        "_type": TRUST_ROOT_TYPE,
        "spec_version": 1,
        "version": 1,
        "expires": "2030-01-01T00:00:00Z",
        "keys": {key.keyid: {"keytype": "ed25519", "public": key.public.to_b64()}},
        "roles": {
            "root": {"keyids": [key.keyid], "threshold": 2},
            "release": {"keyids": [key.keyid], "threshold": 1},
        },
    }
    with pytest.raises(MalformedTrustRootError, match="threshold"):
        sign_trust_root(body, [key])
