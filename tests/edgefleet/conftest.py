"""Fixtures for the wire-contract tests (helpers live in bundlekit.py)."""

from tests.edgefleet.bundlekit import build, keydir, tiny_model, trust_root

__all__ = ["build", "keydir", "tiny_model", "trust_root"]
