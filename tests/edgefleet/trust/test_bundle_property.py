"""Property: any flipped, inserted or truncated byte anywhere in a valid bundle is
rejected with an error of the verification family — never accepted, never an
unexpected exception."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.build import BuildOptions, build_bundle
from edgefleet.errors import VerificationError
from edgefleet.keystore import KeyStore
from edgefleet.trust import MemorySink, verify_bundle
from tests.edgefleet.bundlekit import DEVICE, NOW, release_key


@pytest.fixture(scope="module", params=["zstd", "none"])
def genuine(request, tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp(f"prop-{request.param}")
    store = KeyStore(tmp / "keys")
    store.init(now=NOW - timedelta(days=1))
    out = tmp / "b.bundle"
    build_bundle(
        tiny_model,
        BuildOptions(name="tiny", version=3, compression=request.param),
        [release_key(store)],
        out,
        now=NOW - timedelta(hours=1),
    )
    data = out.read_bytes()
    root = store.trust_root()
    verify_bundle(data, trust_root=root, device=DEVICE, installed={}, now=NOW)  # sanity
    return data, root


def _check_rejected(data: bytes, root) -> None:
    sink = MemorySink()
    try:
        verify_bundle(data, trust_root=root, device=DEVICE, installed={}, now=NOW, sink=sink)
    except VerificationError:
        assert sink.files == {}, "a rejected bundle must not complete a payload"
        return
    raise AssertionError("a modified bundle was accepted")


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**9), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.none()),
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutation)
def test_bundle_any_byte_change_rejected(genuine, m):
    data, root = genuine
    kind, pos, arg = m
    if kind == "flip":
        i = pos % len(data)
        mutated = data[:i] + bytes([data[i] ^ arg]) + data[i + 1 :]
    elif kind == "insert":
        i = pos % (len(data) + 1)
        mutated = data[:i] + arg + data[i:]
    else:
        mutated = data[: pos % len(data)]
    _check_rejected(mutated, root)


def test_bundle_every_single_byte_flip_in_metadata_rejected(genuine):
    """Exhaustive over the manifest/signature region, where a lax parser would bite."""
    data, root = genuine
    limit = min(len(data), 4096)
    for i in range(limit):
        _check_rejected(data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1 :], root)
