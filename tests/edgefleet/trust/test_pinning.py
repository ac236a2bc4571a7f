"""``accept_root`` as a pure function: one test per rule it enforces."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from edgefleet.errors import (
    ExpiredError,
    RollbackError,
    ThresholdNotMetError,
    UnknownKeyError,
    VerificationError,
)
from edgefleet.keys import SigningKey, generate
from edgefleet.timeutil import format_utc
from edgefleet.trust import TRUST_ROOT_TYPE, TrustRoot, accept_root, accept_root_chain
from edgefleet.trust.root import sign_trust_root

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
RELEASE = generate()


def make_root(
    version: int,
    root_keys: list[SigningKey],
    signers: list[SigningKey],
    *,
    expires: datetime = NOW + timedelta(days=30),
) -> TrustRoot:
    keys = [*root_keys, RELEASE]
    signed = {
        "_type": TRUST_ROOT_TYPE,
        "spec_version": 1,
        "version": version,
        "expires": format_utc(expires),
        "keys": {k.keyid: {"keytype": "ed25519", "public": k.public.to_b64()} for k in keys},
        "roles": {
            "root": {"keyids": sorted(k.keyid for k in root_keys), "threshold": 1},
            "release": {"keyids": [RELEASE.keyid], "threshold": 1},
        },
    }
    return sign_trust_root(signed, signers)


OLD, NEW = generate(), generate()
V1 = make_root(1, [OLD], [OLD])


def test_first_use_pins_a_self_signed_root():
    assert accept_root(None, V1.to_bytes(), NOW).to_bytes() == V1.to_bytes()


def test_first_use_refuses_a_root_not_self_signed():
    with pytest.raises(ThresholdNotMetError):
        accept_root(None, make_root(1, [OLD], []).to_bytes(), NOW)


def test_same_root_re_pinned_returns_current():
    assert accept_root(V1, V1.to_bytes(), NOW) is V1


def test_successor_signed_by_both_thresholds_accepted():
    v2 = make_root(2, [NEW], [OLD, NEW])
    assert accept_root(V1, v2.to_bytes(), NOW).version == 2


def test_rollback_of_the_root_version_refused():
    v2 = make_root(2, [NEW], [OLD, NEW])
    with pytest.raises(RollbackError, match="not newer than the trusted v2"):
        accept_root(v2, V1.to_bytes(), NOW)


def test_skipping_versions_refused():
    v3 = make_root(3, [NEW], [OLD, NEW])
    with pytest.raises(VerificationError, match="skips versions"):
        accept_root(V1, v3.to_bytes(), NOW)


def test_threshold_of_the_old_root_required():
    v2 = make_root(2, [NEW], [NEW])
    with pytest.raises(UnknownKeyError, match="not the pinned trust root v1"):
        accept_root(V1, v2.to_bytes(), NOW)


def test_threshold_of_the_new_root_required():
    v2 = make_root(2, [NEW], [OLD])
    with pytest.raises(UnknownKeyError, match="not root keys"):
        accept_root(V1, v2.to_bytes(), NOW)


def test_expired_root_refused_on_first_use_and_as_successor():
    stale = NOW - timedelta(seconds=1)
    with pytest.raises(ExpiredError):
        accept_root(None, make_root(1, [OLD], [OLD], expires=stale).to_bytes(), NOW)
    with pytest.raises(ExpiredError, match="not the pinned trust root v1"):
        accept_root(V1, make_root(2, [NEW], [OLD, NEW], expires=stale).to_bytes(), NOW)


def test_chain_only_the_final_root_must_be_unexpired():
    v2 = make_root(2, [NEW], [OLD, NEW], expires=NOW - timedelta(days=1))
    v3 = make_root(3, [NEW], [NEW])
    assert accept_root_chain(V1, [v2.to_bytes(), v3.to_bytes()], NOW).version == 3
    with pytest.raises(ExpiredError):
        accept_root_chain(V1, [v2.to_bytes()], NOW)
