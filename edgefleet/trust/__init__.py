"""Trust: every "is this trustworthy?" decision the device makes, in one package.

Where each decision lives (the flow on a device, in order of use):

* ``root``: the trust root document (``TrustRoot``), its roles and
  ``verify_threshold`` -- a threshold of distinct known keys of a role signed
  these exact bytes. Everything below is judged against a ``TrustRoot``.
* ``pinning``: ``accept_root(current, candidate, now)`` -- which root to pin
  (first use, same root, or a version N+1 successor signed by both root-key
  thresholds); ``accept_root_chain`` walks a rotation chain.
* ``desired``: ``verify_desired_state`` -- a retained desired-state payload is
  signed by the director role, for this device/group, on its topic, unexpired
  and above the accepted version.
* ``bundle``: ``verify_bundle`` -- the streaming bundle verifier (layout,
  release-role signatures before interpreting the manifest, expiry, target,
  rollback, payload hashes, bounded decompression).

Invariants: every function here is pure -- no file or network I/O, no clock
reads (``now`` is an argument); bytes (or a stream handed in) in, a verdict
out or exactly one ``VerificationError`` subclass raised. Building and signing
(what these decisions judge) live in ``edgefleet.release``; ``sign_trust_root``
is defined in ``root`` beside the document format and re-exported by
``edgefleet.release``, the signing side.
"""

from __future__ import annotations

from edgefleet.trust.bundle import (
    BundleHeader,
    MemorySink,
    NullSink,
    PayloadSink,
    VerifiedBundle,
    VerifierLimits,
    read_header,
    verify_bundle,
)
from edgefleet.trust.desired import verify_desired_state
from edgefleet.trust.pinning import accept_root, accept_root_chain
from edgefleet.trust.root import (
    MAX_SIGNATURES,
    ROLES,
    TRUST_ROOT_TYPE,
    MalformedTrustRootError,
    Role,
    Signature,
    TrustRoot,
    parse_signatures,
    sign_trust_root,
    verify_threshold,
)

__all__ = [
    "MAX_SIGNATURES",
    "ROLES",
    "TRUST_ROOT_TYPE",
    "BundleHeader",
    "MalformedTrustRootError",
    "MemorySink",
    "NullSink",
    "PayloadSink",
    "Role",
    "Signature",
    "TrustRoot",
    "VerifiedBundle",
    "VerifierLimits",
    "accept_root",
    "accept_root_chain",
    "parse_signatures",
    "read_header",
    "sign_trust_root",
    "verify_bundle",
    "verify_desired_state",
    "verify_threshold",
]
