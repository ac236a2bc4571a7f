"""What the device agent costs over bare onnxruntime, measured in the same run.

``python benchmarks/agent.py [--json] [--rounds N] [--calls N] [--model FILE.onnx]``

Every figure is against a baseline measured in the same process (or, for
memory, in a sibling process started the same way):

* ``added_us``: median time ``Agent.predict`` adds over a bare
  ``InferenceSession.run`` of the same session and input (target <= 3 us), on
  the fraud example model, batch 1: trained with ``examples/fraud/train.py``
  and compressed with ``edgefleet compress`` (as the demo does, ~15 s) when
  torch is installed; ``--model FILE.onnx`` takes an existing one (its
  ``health_check.json``/``drift_reference.json`` beside it are used); without
  torch, or with ``--mlp``, an MLP of the fraud model's size built in code
  (32 features -> 256 -> 128 -> 2, Gemm/Relu/Softmax). The output names it.
* ``predict_ratio``: median per-call time of ``Agent.predict`` / bare ``run``
  on a digits-sized CNN (1x8x8 input, Conv/Relu/MaxPool/Gemm; target <= 1.05).
* ``telemetry_us``: amortized telemetry cost per prediction (target <= 2 us):
  predictions with the observer attached, plus the off-hot-path aggregation
  (histograms over the manifest's drift-reference features) every
  ``--calls`` predictions, minus the same predictions without an observer.
  Uses ``agent.telemetry.TelemetryRecorder`` when importable, else a minimal
  observer (deque append + batched numpy binning); the output says which.
* ``rss_ratio``: resident memory of an idle agent process with the model
  loaded / a bare Python process holding an ``InferenceSession`` of the same
  model with the same options (target <= 1.25).

Timing: interleaved rounds of ``--calls`` calls each, garbage collector off,
one intra-op thread; a figure is the median over rounds (``added_us`` is the
median of per-round paired differences).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.core import Agent
from agent.options import AgentOptions
from firmware_sim.models import Release, cnn_model, golden_health_check, mlp_model

TARGETS = {"added_us": 3.0, "predict_ratio": 1.05, "telemetry_us": 2.0, "rss_ratio": 1.25}
BINS = 10


def drift_reference(features: int) -> dict[str, Any]:
    """Deciles of N(0, 1) for every feature (what the compressor would profile)."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20000, features))
    qs = np.linspace(0, 1, BINS + 1)[1:-1]
    out = []
    for i in range(features):
        edges = np.quantile(ref[:, i], qs).tolist()
        counts = np.bincount(np.searchsorted(edges, ref[:, i], side="right"), minlength=BINS)
        expected = (counts / counts.sum()).tolist()
        expected[-1] = 1.0 - sum(expected[:-1])
        out.append({"input": "x", "index": i, "name": f"f{i}", "edges": edges,
                    "expected": expected})  # fmt: skip
    return {"bins": BINS, "features": out}


def install(work: Path, rel: Release, name: str, model: bytes, x: np.ndarray, **kw: Any) -> Path:
    state = work / f"state-{name}"
    kw.setdefault("health_check", golden_health_check(model, {"x": x}))
    bundle = rel.build(model, name=name, version=1, **kw)
    with Agent(state, AgentOptions()) as agent:
        agent.pin_trust_root(rel.trust_root_bytes)
        result = agent.install(bundle)
        if not result.ok:
            raise RuntimeError(f"installing {name} failed: {result.error}")
    return state


def rounds_of(fns: dict[str, Callable[[int], float]], rounds: int, calls: int) -> dict[str, list]:
    """Interleave the timed loops; per-call seconds per round for each."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn(max(50, calls // 10))  # warm-up
    order = list(fns)
    gc.disable()
    try:
        for r in range(rounds):
            # Alternate the order so that neither side always runs first (cache, clock).
            for key in order if r % 2 == 0 else reversed(order):
                out[key].append(fns[key](calls))
    finally:
        gc.enable()
    return out


def loops(agent: Agent, feed: dict[str, np.ndarray]) -> dict[str, Callable[[int], float]]:
    session = agent.serving_session
    manifest = agent.serving_manifest
    assert session is not None and manifest is not None
    names = [t.name for t in manifest.outputs]
    run = session.run
    predict = agent.predict

    def bare(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            run(names, feed)
        return (time.perf_counter() - start) / n

    def via_agent(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            predict(feed)
        return (time.perf_counter() - start) / n

    return {"bare": bare, "agent": via_agent}


def measure_added(state: Path, x: np.ndarray, rounds: int, calls: int) -> dict[str, Any]:
    with Agent(state, readonly=True) as agent:
        t = rounds_of(loops(agent, {"x": x}), rounds, calls)
    diffs = [a - b for a, b in zip(t["agent"], t["bare"], strict=True)]
    return {
        "added_us": round(statistics.median(diffs) * 1e6, 3),
        "bare_us": round(statistics.median(t["bare"]) * 1e6, 3),
        "agent_us": round(statistics.median(t["agent"]) * 1e6, 3),
    }


def measure_ratio(state: Path, x: np.ndarray, rounds: int, calls: int) -> dict[str, Any]:
    with Agent(state, readonly=True) as agent:
        t = rounds_of(loops(agent, {"x": x}), rounds, calls)
    ratios = [a / b for a, b in zip(t["agent"], t["bare"], strict=True)]
    return {
        "predict_ratio": round(statistics.median(ratios), 4),
        "bare_us": round(statistics.median(t["bare"]) * 1e6, 3),
        "agent_us": round(statistics.median(t["agent"]) * 1e6, 3),
    }


class MinimalRecorder:
    """Fallback observer: append to a deque; bin each batch with numpy, all features at once."""

    def __init__(self, reference: dict[str, Any]) -> None:
        self.buf: collections.deque[tuple[Any, Any, float, int]] = collections.deque(maxlen=100_000)
        features = sorted(reference["features"], key=lambda f: int(f["index"]))
        self.columns = np.asarray([int(f["index"]) for f in features])
        edges = np.asarray([f["edges"] for f in features], np.float32)
        self.edges_by_cut = np.ascontiguousarray(edges.T)  # (bins - 1, F)
        self.offsets = np.arange(edges.shape[0]) * BINS
        self.counts = np.zeros(edges.shape[0] * BINS, np.int64)
        self.latencies: list[float] = []

    def observe(self, inputs: Any, outputs: Any, latency_s: float, prediction_id: int) -> None:
        self.buf.append((inputs, outputs, latency_s, prediction_id))

    def aggregate(self) -> int:
        pop = self.buf.popleft
        batch = [pop() for _ in range(len(self.buf))]
        if not batch:
            return 0
        values = np.concatenate([b[0]["x"] for b in batch])[:, self.columns]  # (N, F)
        # bin = number of edges <= v (== searchsorted(edges, v, side="right")), every
        # feature at once: one comparison of the whole batch per cut point.
        idx = (values >= self.edges_by_cut[0]).astype(np.intp)
        for cut in self.edges_by_cut[1:]:
            idx += values >= cut
        self.counts += np.bincount((idx + self.offsets).ravel(), minlength=self.counts.size)
        self.latencies.extend(b[2] for b in batch)
        return len(batch)


def make_recorder(work: Path, reference: dict[str, Any]) -> tuple[Any, str]:
    try:
        from agent.telemetry import Spool, TelemetryRecorder
        from edgefleet.wire import ModelRef
    except ImportError:
        return MinimalRecorder(reference), "benchmarks.agent.MinimalRecorder (fallback)"
    recorder = TelemetryRecorder(
        "bench-device",
        Spool(work / f"spool-{time.monotonic_ns()}"),
        model=ModelRef("fraud", 1),
        drift_reference=reference,
    )
    return recorder, "agent.telemetry.TelemetryRecorder"


def measure_telemetry(
    state: Path,
    x: np.ndarray,
    work: Path,
    rounds: int,
    calls: int,
    reference: dict[str, Any],
    *,
    minimal: bool = False,
) -> dict[str, Any]:
    """Amortized cost per prediction: hot-path observe + the aggregation it implies."""
    if minimal:
        recorder: Any = MinimalRecorder(reference)
        which = "benchmarks.agent.MinimalRecorder (--recorder minimal)"
    else:
        recorder, which = make_recorder(work, reference)
    rng = np.random.default_rng(1)
    # Distinct inputs per call, as in production (the observer keeps references).
    scale = np.abs(x) * 0.1 + 0.1
    inputs = [
        {"x": (x + rng.normal(size=x.shape) * scale).astype(np.float32)} for _ in range(calls)
    ]
    aggregate_s: list[float] = []
    with Agent(state, readonly=True) as agent:
        predict = agent.predict

        def plain(n: int) -> float:
            start = time.perf_counter()
            for i in range(n):
                predict(inputs[i % calls])
            return (time.perf_counter() - start) / n

        def observed(n: int) -> float:
            agent.set_observer(recorder.observe)
            try:
                start = time.perf_counter()
                for i in range(n):
                    predict(inputs[i % calls])
                hot = time.perf_counter()
                recorder.aggregate()  # the recorder thread's work, charged to these calls
                end = time.perf_counter()
            finally:
                agent.set_observer(None)
            aggregate_s.append((end - hot) / n)
            return (end - start) / n

        t = rounds_of({"plain": plain, "observed": observed}, rounds, calls)
        recorder.aggregate()
    diffs = [a - b for a, b in zip(t["observed"], t["plain"], strict=True)]
    aggregate_us = statistics.median(aggregate_s[-rounds:]) * 1e6
    total_us = statistics.median(diffs) * 1e6
    return {
        "telemetry_us": round(total_us, 3),
        "recorder": which,
        "aggregate_every": calls,
        "hot_path_us": round(total_us - aggregate_us, 3),
        "aggregation_us": round(aggregate_us, 3),
        "plain_us": round(statistics.median(t["plain"]) * 1e6, 3),
        "observed_us": round(statistics.median(t["observed"]) * 1e6, 3),
    }


_RSS = """
import gc, sys, time
def rss_kb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
"""

_AGENT_PROC = (
    _RSS
    + """
sys.path.insert(0, {root!r})
import numpy as np
from agent.core import Agent
agent = Agent({state!r})
agent.predict(np.zeros({shape!r}, np.float32))
gc.collect(); time.sleep(0.2)
print(rss_kb())
"""
)

_BARE_PROC = (
    _RSS
    + """
import numpy as np
import onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.log_severity_level = 3
session = ort.InferenceSession({model!r}, sess_options=so, providers=["CPUExecutionProvider"])
session.run(None, {{"x": np.zeros({shape!r}, np.float32)}})
gc.collect(); time.sleep(0.2)
print(rss_kb())
"""
)


def measure_rss(state: Path, shape: tuple[int, ...], repeats: int = 3) -> dict[str, Any]:
    model = str(state / "slots" / "a" / "model.onnx")
    root = str(Path(__file__).resolve().parents[1])

    def run(code: str) -> int:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)  # fmt: skip
        return int(out.stdout.strip().splitlines()[-1])

    agent_kb, bare_kb = [], []
    for _ in range(repeats):
        bare_kb.append(run(_BARE_PROC.format(model=model, shape=shape)))
        agent_kb.append(run(_AGENT_PROC.format(root=root, state=str(state), shape=shape)))
    a, b = statistics.median(agent_kb), statistics.median(bare_kb)
    return {"rss_ratio": round(a / b, 4), "agent_rss_kb": a, "bare_rss_kb": b}


def fraud_example(args: argparse.Namespace, work: Path) -> tuple[bytes, str, dict[str, Any]]:
    """(model bytes, description, compressor outputs) of the fraud model to measure."""
    from edgefleet.build import load_compression_outputs

    if args.model is not None:
        return args.model.read_bytes(), str(args.model), load_compression_outputs(args.model.parent)
    if not args.mlp:
        try:
            import torch  # noqa: F401 - only to know whether the example can be trained
        except ImportError:
            pass
        else:
            out = build_fraud_example(work / "fraud-example")
            desc = "examples/fraud (train.py + edgefleet compress, as in the demo)"
            return out.read_bytes(), desc, load_compression_outputs(out.parent)
    model = mlp_model((32, 256, 128, 2))
    return model, "MLP 32->256->128->2 (Gemm/Relu/Softmax) built in code, fraud-sized", {}


def build_fraud_example(work: Path) -> Path:
    """Train and compress the fraud example exactly as examples/demo.sh does."""
    root = Path(__file__).resolve().parents[1]
    train = subprocess.run(
        [sys.executable, str(root / "examples/fraud/train.py"), "--out", str(work / "model")],
        capture_output=True,
        text=True,
        check=True,
    )
    names = json.loads(train.stdout.strip().splitlines()[-1])["feature_names"]
    subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "compress", str(work / "model/model.pt2"),
         "--calib", str(work / "model/calib.npz"), "--eval", str(work / "model/eval.npz"),
         "--out", str(work / "compressed"), "--metric", "accuracy", "--max-drop", "0.01",
         "--prune", "0.7", "--quant", "auto", "--feature-names", ",".join(names), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    return work / "compressed" / "model.onnx"


def first_row(model: bytes, extra: dict[str, Any]) -> np.ndarray:
    """One input row (batch 1): from the golden inputs when there are some."""
    import onnxruntime as ort

    from agent.health import decode_array

    hc = extra.get("health_check")
    if hc:
        golden = decode_array(next(iter(hc["inputs"].values())))
        return np.ascontiguousarray(golden[:1]).astype(np.float32)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    return np.random.default_rng(0).normal(size=(1, int(inp.shape[1]))).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds (31)")
    parser.add_argument("--calls", type=int, default=400, help="calls per round (400)")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="the fraud example's compressed ONNX (single input [batch, F]) to use",
    )
    parser.add_argument("--mlp", action="store_true", help="use the fraud-sized MLP built in code")
    parser.add_argument(
        "--recorder",
        choices=("auto", "minimal"),
        default="auto",
        help="auto: agent.telemetry.TelemetryRecorder when importable (default)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-agent-") as tmp:
        work = Path(tmp)
        rel = Release(work / "release")
        fraud_model, fraud_desc, extra = fraud_example(args, work)
        x = first_row(fraud_model, extra)
        reference = extra.get("drift_reference") or drift_reference(x.shape[1])
        fraud = install(
            work,
            rel,
            "fraud",
            fraud_model,
            x,
            drift_reference=reference,
            **({"health_check": extra["health_check"]} if "health_check" in extra else {}),
        )
        digits_x = np.random.default_rng(1).normal(size=(1, 1, 8, 8)).astype(np.float32)
        digits = install(work, rel, "digits", cnn_model(), digits_x)

        added = measure_added(fraud, x, args.rounds, args.calls)
        ratio = measure_ratio(digits, digits_x, args.rounds, args.calls)
        telemetry = measure_telemetry(
            fraud, x, work, args.rounds, args.calls, reference, minimal=args.recorder == "minimal"
        )
        minimal = (
            telemetry
            if args.recorder == "minimal"
            else measure_telemetry(fraud, x, work, args.rounds, args.calls, reference, minimal=True)
        )
        rss = measure_rss(fraud, x.shape)

    result: dict[str, Any] = {
        "added_us": added["added_us"],
        "predict_ratio": ratio["predict_ratio"],
        "telemetry_us": telemetry["telemetry_us"],
        "rss_ratio": rss["rss_ratio"],
        "targets": TARGETS,
        "meets_targets": {
            key: result_value <= TARGETS[key]
            for key, result_value in (
                ("added_us", added["added_us"]),
                ("predict_ratio", ratio["predict_ratio"]),
                ("telemetry_us", telemetry["telemetry_us"]),
                ("rss_ratio", rss["rss_ratio"]),
            )
        },
        "details": {
            "fraud_model": fraud_desc,
            "fraud": added,
            "digits_model": "CNN 1x8x8: Conv3x3(16)/Relu/MaxPool2/Flatten/Gemm(10)/Softmax",
            "digits": ratio,
            "telemetry": telemetry,
            "telemetry_minimal_observer": minimal,
            "memory": rss,
            "rounds": args.rounds,
            "calls_per_round": args.calls,
            "onnxruntime_threads": 1,
        },
    }
    if args.json:
        print(json.dumps(result))
    else:
        d = result["details"]
        print(f"fraud model: {d['fraud_model']}")
        print(f"  bare run {added['bare_us']} us, Agent.predict {added['agent_us']} us")
        print(f"  added_us      {added['added_us']:8.3f}   (target <= {TARGETS['added_us']})")
        print(f"digits CNN: bare {ratio['bare_us']} us, agent {ratio['agent_us']} us")
        print(f"  predict_ratio {ratio['predict_ratio']:8.4f}   (target <= 1.05)")
        print(f"telemetry ({telemetry['recorder']}, aggregate every {args.calls} predictions)")
        print(
            f"  telemetry_us  {telemetry['telemetry_us']:8.3f}   (target <= 2): hot path "
            f"{telemetry['hot_path_us']} us + aggregation {telemetry['aggregation_us']} us"
        )
        print(
            f"  (minimal observer for comparison: {minimal['telemetry_us']} us = hot path "
            f"{minimal['hot_path_us']} + aggregation {minimal['aggregation_us']})"
        )
        print(f"idle RSS: agent {rss['agent_rss_kb']} kB, bare session {rss['bare_rss_kb']} kB")
        print(f"  rss_ratio     {rss['rss_ratio']:8.4f}   (target <= 1.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
