"""Bundle verification cost against bare sha256 over the same bytes.

``python benchmarks/verify.py [--json] [--repeat N]``

For payloads of 1, 10 and 100 MB (random, stored uncompressed) it builds a
signed bundle in memory, then times, in the same process and interleaved:

* baseline: ``hashlib.sha256(payload).hexdigest()`` over the payload bytes;
* verify:   ``verify_bundle`` over the whole bundle (ustar parsing, signature
  threshold, manifest validation, streamed sha256, trailer check) into a sink
  that discards the bytes.

It prints the median seconds of each and their ratio (target <= 1.3 at 10 MB
and above). With ``--json`` it prints one JSON object with ``ratio_1mb``,
``ratio_10mb``, ``ratio_100mb`` and the raw timings.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgefleet.keystore import KeyStore
from edgefleet.manifest import DeviceFacts, Manifest, PayloadEntry, Targets, TensorSpec
from edgefleet.release import sign_manifest, write_bundle
from edgefleet.timeutil import utcnow
from edgefleet.trust import NullSink, verify_bundle

SIZES_MB = (1, 10, 100)
TARGET = 1.3


def make_bundle(store: KeyStore, payload: bytes) -> bytes:
    digest = hashlib.sha256(payload).hexdigest()
    entry = PayloadEntry("model.onnx", len(payload), digest, "none", len(payload), digest)
    now = utcnow()
    manifest = Manifest(
        name="bench",
        version=1,
        created=now,
        expires=now + timedelta(days=1),
        targets=Targets(),
        payload=(entry,),
        inputs=(TensorSpec("x", "float32", ("batch", 8)),),
        outputs=(TensorSpec("y", "float32", ("batch", 2)),),
    )
    mbytes = manifest.to_bytes()
    keys = store.signing_keys(store.trust_root().role("release").keyids)
    buf = io.BytesIO()
    write_bundle(buf, mbytes, sign_manifest(mbytes, keys), [(entry, io.BytesIO(payload))])
    return buf.getvalue()


def measure(repeat: int) -> dict[str, object]:
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = KeyStore(Path(tmp) / "keys")
        store.init()
        root = store.trust_root()
        for mb in SIZES_MB:
            payload = os.urandom(mb * 1_000_000)
            bundle = make_bundle(store, payload)
            base_t, ver_t = [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                hashlib.sha256(payload).hexdigest()
                base_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                verify_bundle(
                    bundle,
                    trust_root=root,
                    device=DeviceFacts(),
                    installed={},
                    now=utcnow(),
                    sink=NullSink(),
                )
                ver_t.append(time.perf_counter() - t0)
            base, ver = statistics.median(base_t), statistics.median(ver_t)
            results[f"baseline_s_{mb}mb"] = round(base, 6)
            results[f"verify_s_{mb}mb"] = round(ver, 6)
            results[f"ratio_{mb}mb"] = round(ver / base, 3)
            del payload, bundle
    results["target_ratio_10mb_and_above"] = TARGET
    results["meets_target"] = all(
        float(results[f"ratio_{mb}mb"]) <= TARGET  # type: ignore[arg-type]
        for mb in SIZES_MB
        if mb >= 10
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per size (median)")
    args = parser.parse_args()
    results = measure(args.repeat)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        print(f"{'payload':>8} {'sha256 (s)':>12} {'verify (s)':>12} {'ratio':>7}")
        for mb in SIZES_MB:
            print(
                f"{mb:>6}MB {results[f'baseline_s_{mb}mb']:>12.4f} "
                f"{results[f'verify_s_{mb}mb']:>12.4f} {results[f'ratio_{mb}mb']:>7.3f}"
            )
        print(f"target: ratio <= {TARGET} at 10 MB and above -> "
              f"{'met' if results['meets_target'] else 'NOT met'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
