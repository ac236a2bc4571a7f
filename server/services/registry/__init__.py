"""Model registry: uploads, build jobs' work, offline signing and publishing.

One module per job; this package re-exports their public names, so
``from server.services import registry; registry.X`` works as before:

- ``keyring``: the trust root and the online release key (``load_trust_root``,
  ``load_release_key``).
- ``uploads``: ``submit_version`` validates and stores an upload.
- ``builds``: ``run_build``, a build job's work.
- ``signing``: ``manifest_bytes``, ``add_signature``, ``publish``.
- ``catalog``: status constants, ``VersionOptions``, ``BuildError`` and the
  read-only look-ups the others share.

Flow::

    submit_version  (validate, store upload, rows: version "queued" + job)
      -> run_build  (worker: compress if asked -> build_bundle -> manifest stored)
         -> signing "online":  signed with the server's release key; published
            at once when that meets the trust root's release threshold
         -> signing "offline" (or threshold > 1): "awaiting_signatures";
            clients fetch ``manifest_bytes``, ``add_signature`` verifies each
            signature against the trust root's release role, ``publish``
            writes the final bundle once the threshold is met.

Invariants: a (name, version) is immutable: once it exists (and has not
failed) any new upload of it answers 409, and a published version's bundle,
manifest and signatures never change (``publish`` twice answers 409). The
bundle file is written atomically at its final path before the row says
"published", and its signatures verify against the trust root (checked
again on the written file). Bad input is refused before any row or file is
touched. Compression runs only through ``compression.compress``; when that
package is missing the job fails with a message saying so.

- ``preflight``: ``preflight``, the pre-signing health check: the server's one
  recorded use of the agent; the import-linter exception in pyproject.toml
  names this module and no other.
"""

from __future__ import annotations

from server.services.registry.builds import run_build
from server.services.registry.catalog import (
    MAX_MODEL_CARD_BYTES,
    MAX_VERSION,
    STATUS_AWAITING,
    STATUS_BUILDING,
    STATUS_FAILED,
    STATUS_PUBLISHED,
    STATUS_QUEUED,
    BuildError,
    Progress,
    VersionOptions,
    bundle_id,
    bundle_path,
    get_model,
    get_version,
    list_models,
    signature_status,
)
from server.services.registry.keyring import load_release_key, load_trust_root
from server.services.registry.signing import add_signature, manifest_bytes, publish
from server.services.registry.uploads import MAX_MODEL_CARD_DEPTH, submit_version

__all__ = [
    "MAX_MODEL_CARD_BYTES",
    "MAX_MODEL_CARD_DEPTH",
    "MAX_VERSION",
    "STATUS_AWAITING",
    "STATUS_BUILDING",
    "STATUS_FAILED",
    "STATUS_PUBLISHED",
    "STATUS_QUEUED",
    "BuildError",
    "Progress",
    "VersionOptions",
    "add_signature",
    "bundle_id",
    "bundle_path",
    "get_model",
    "get_version",
    "list_models",
    "load_release_key",
    "load_trust_root",
    "manifest_bytes",
    "publish",
    "run_build",
    "signature_status",
    "submit_version",
]
