"""Telemetry: hot path, binning contract, spool bounds and faults, delivery via a real broker."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import agent.telemetry.recorder as telemetry_module
import agent.telemetry.spool as spool_module
from agent.mqtt import MqttConnection, MqttOptions
from agent.telemetry import (
    Spool,
    TelemetryOptions,
    TelemetryPublisher,
    TelemetryRecorder,
    VitalsProbe,
    bin_matrix,
)
from edgefleet.topics import DeviceChannel, DeviceTopic, all_devices, mosquitto_acl
from edgefleet.wire import ModelRef, TelemetryRecord
from tests.mosquitto import Mosquitto, wait_until

DEVICE = "pi-1"
EDGES = [float(e) for e in np.linspace(-2, 2, 9)]


def reference(features: int = 3, channels: int = 2) -> dict:
    return {
        "bins": 10,
        "features": [
            {"input": "x", "index": i, "name": f"f{i}", "edges": EDGES, "expected": [0.1] * 10}
            for i in range(features)
        ],
        "channels": [
            {
                "input": "img",
                "channel": c,
                "mean": 0.0,
                "std": 1.0,
                "edges": EDGES,
                "expected": [0.1] * 10,
            }
            for c in range(channels)
        ],
    }


def recorder(tmp_path: Path, **kw) -> TelemetryRecorder:
    opts = kw.pop("options", TelemetryOptions())
    spool = kw.pop("spool", None)
    if spool is None:
        spool = Spool(tmp_path / "spool")
    return TelemetryRecorder(DEVICE, spool, opts, **kw)


def records(spool: Spool) -> list[TelemetryRecord]:
    return [TelemetryRecord.from_bytes(spool.read(s) or b"") for s in spool.pending()]


def test_observe_does_no_numpy_work_and_keeps_references(tmp_path, monkeypatch) -> None:
    rec = recorder(tmp_path, drift_reference=reference())
    x = np.ones((2, 3), np.float32)
    out = [np.zeros((2, 4), np.float32)]

    class NoNumpy:
        def __getattr__(self, name: str):
            raise AssertionError(f"numpy.{name} used on the hot path")

    monkeypatch.setattr(telemetry_module, "np", NoNumpy())
    for pid in range(1000):
        rec.observe({"x": x}, out, 0.001, pid)
    monkeypatch.undo()
    assert len(rec._buf) == 1000 and rec._buf[0][0]["x"] is x  # references, not copies
    assert rec._window.predictions == 0  # nothing aggregated yet
    assert rec.aggregate() == 1000


def test_histograms_follow_the_manifest_binning_contract(tmp_path) -> None:
    rng = np.random.default_rng(3)
    rec = recorder(tmp_path, drift_reference=reference(), model=ModelRef("tiny", 2))
    xs, imgs = [], []
    for pid in range(40):
        x = rng.normal(size=(int(rng.integers(1, 5)), 3))
        x[0, 1] = np.nan if pid % 7 == 0 else x[0, 1]
        x[0, 2] = EDGES[4]  # a value on an edge goes to the upper bin
        img = rng.normal(size=(1, 2, 4, 4)).astype(np.float32)
        xs.append(x)
        imgs.append(img)
        rec.observe({"x": x, "img": img}, [rng.random((len(x), 3))], 0.002, pid)
    seq = rec.close_window()
    (record,) = records(rec.spool)
    assert record.seq == seq and record.predictions == 40
    allx = np.concatenate(xs)
    for feat in record.features:
        col = allx[:, feat.index]
        good = col[np.isfinite(col)]
        want = np.bincount(np.searchsorted(EDGES, good, side="right"), minlength=10)
        assert list(feat.counts) == want.tolist()
        assert feat.nonfinite == int((~np.isfinite(col)).sum())
    assert record.features[1].nonfinite == 6
    allimg = np.concatenate(imgs)
    for chan in record.channels:
        values = allimg[:, chan.channel].ravel().astype(np.float64)
        want = np.bincount(np.searchsorted(EDGES, values, side="right"), minlength=10)
        assert list(chan.counts) == want.tolist()
        assert chan.mean == pytest.approx(values.mean(), abs=1e-5)


def test_bin_matrix_equals_searchsorted_per_column() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5000, 7))
    values[::13, 3] = np.inf
    edges = np.sort(rng.normal(size=(7, 9)), axis=1)
    counts, nonfinite = bin_matrix(values, edges, 10)
    for f in range(7):
        col = values[:, f][np.isfinite(values[:, f])]
        want = np.bincount(np.searchsorted(edges[f], col, side="right"), minlength=10)
        assert counts[f].tolist() == want.tolist()
    assert nonfinite.tolist() == [0, 0, 0, 385, 0, 0, 0]


def test_latency_quantiles_and_output_distribution(tmp_path) -> None:
    rec = recorder(tmp_path)
    lat = np.arange(1, 101) / 1000.0  # 1..100 ms
    for pid, seconds in enumerate(lat):
        probs = np.zeros((1, 3))
        probs[0, pid % 3] = 1.0
        rec.observe(
            {"x": np.zeros((1, 2))}, [probs, np.array([pid], np.int64)], float(seconds), pid
        )
    rec.observe_error("bad-input")
    rec.close_window()
    (record,) = records(rec.spool)
    assert record.latency_ms is not None
    assert record.latency_ms.p50 == pytest.approx(np.quantile(lat * 1000, 0.5))
    assert record.latency_ms.p99 == pytest.approx(np.quantile(lat * 1000, 0.99))
    assert record.latency_ms.max == pytest.approx(100.0)
    assert record.outputs[0].classes == (34, 33, 33)
    assert record.outputs[1].classes is None and record.outputs[1].max == 99
    assert record.errors == 1 and record.error_kinds == {"bad-input": 1}


def test_feedback_is_joined_with_the_predicted_class(tmp_path) -> None:
    rec = recorder(tmp_path)
    rec.observe({"x": np.zeros((1, 2))}, [np.array([[0.1, 0.9]])], 0.001, 41)
    rec.feedback(41, 1)
    rec.feedback(99, "unknown-prediction")
    rec.feedback(42, object())
    rec.close_window()
    (record,) = records(rec.spool)
    assert [(f.prediction_id, f.label, f.predicted) for f in record.feedback] == [
        (41, 1, 1),
        (99, "unknown-prediction", None),
    ]
    assert record.error_kinds == {"bad-feedback": 1}


def test_sampling_is_off_by_default_and_capped(tmp_path) -> None:
    rec = recorder(tmp_path)
    for pid in range(50):
        rec.observe({"x": np.full((1, 2), pid, np.float32)}, [np.zeros((1, 2))], 0.001, pid)
    rec.close_window()
    assert records(rec.spool)[0].samples == ()
    opts = TelemetryOptions(sample_rate=1.0, samples_per_window=3)
    rec = recorder(tmp_path / "b", options=opts)
    for pid in range(50):
        rec.observe({"x": np.full((1, 2), pid, np.float32)}, [np.zeros((1, 2))], 0.001, pid)
    rec.close_window()
    samples = records(rec.spool)[0].samples
    assert len(samples) == 3
    sample = samples[0]
    x = np.frombuffer(sample.inputs["x"].data, "<f4").reshape(sample.inputs["x"].shape)
    assert (x == sample.prediction_id).all()


def test_buffer_overflow_is_counted(tmp_path) -> None:
    rec = recorder(tmp_path, options=TelemetryOptions(buffer_max=16))
    for pid in range(50):
        rec.observe({}, [], 0.001, pid)
    rec.close_window()
    (record,) = records(rec.spool)
    assert record.predictions == 16 and record.dropped_observations == 34


def test_shadow_stats_and_events_are_reported(tmp_path) -> None:
    stats = {
        "model": "tiny",
        "version": 3,
        "compared": 10,
        "dropped": 1,
        "top1_agreement": 0.9,
        "mean_abs_diff": None,
        "shadow_latency_ms_p50": 1.5,
        "active_latency_ms_p50": 1.2,
        "labelled": 4,
        "active_accuracy": 0.75,
        "shadow_accuracy": 1.0,
    }
    rec = recorder(tmp_path, shadow_stats=lambda: stats)
    rec.event("install-failed", desired_version=4, model=ModelRef("tiny", 3), reason="health check")
    rec.close_window()
    (record,) = records(rec.spool)
    assert record.shadow is not None and record.shadow.agreement == 0.9
    assert record.shadow.model == ModelRef("tiny", 3) and record.shadow.labelled == 4
    assert record.events[0].kind == "install-failed" and record.events[0].reason == "health check"


def test_health_probe_reads_what_linux_exposes(tmp_path) -> None:
    zone = tmp_path / "thermal_zone0"
    zone.mkdir()
    (zone / "temp").write_text("48250\n")
    probe = VitalsProbe(tmp_path, thermal_glob=str(tmp_path / "thermal_zone*" / "temp"))
    sum(range(200_000))
    health = probe.snapshot()
    assert health.temperature_c == 48.25
    assert health.rss_bytes and health.rss_bytes > 1 << 20
    assert health.disk_free_bytes and health.disk_free_bytes > 0
    assert health.cpu_percent is not None and health.cpu_percent >= 0


def test_background_thread_closes_windows(tmp_path) -> None:
    rec = recorder(tmp_path, options=TelemetryOptions(window_s=0.1, aggregate_interval_s=0.02))
    rec.start()
    for pid in range(20):
        rec.observe({}, [], 0.001, pid)
        time.sleep(0.01)
    assert wait_until(lambda: len(rec.spool) >= 2, 5)
    rec.stop()
    got = records(rec.spool)
    assert sum(r.predictions for r in got) == 20
    seqs = [r.seq for r in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_spool_bound_drops_oldest_and_counts(tmp_path) -> None:
    spool = Spool(tmp_path / "spool", max_records=3)
    rec = recorder(tmp_path, spool=spool)
    seqs = [rec.close_window() for _ in range(5)]
    assert spool.pending() == seqs[2:]  # the two oldest were evicted
    rec.close_window()  # makes room by evicting one more
    got = records(spool)
    # Each eviction is counted and reported in the record written after it.
    assert [r.spool.dropped for r in got] == [0, 1, 1]
    byte_bound = Spool(tmp_path / "small", max_bytes=4096)
    rec = recorder(tmp_path, spool=byte_bound)
    for _ in range(10):
        rec.close_window()
    assert byte_bound.bytes <= 4096 and len(byte_bound) < 10


class FullDisk:
    """A real directory with a byte budget: writes beyond it fail with ENOSPC."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.failures = 0

    def __call__(self, path: Path, data: bytes) -> None:
        if len(data) > self.budget:
            self.failures += 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        self.budget -= len(data)
        spool_module._atomic_write(path, data)


def test_spool_enospc_does_not_crash_and_is_reported(tmp_path) -> None:
    disk = FullDisk(budget=6000)
    spool = Spool(tmp_path / "spool", write_file=disk)
    rec = recorder(tmp_path, spool=spool, drift_reference=reference(features=3))
    results = []
    for pid in range(12):
        rec.observe({"x": np.zeros((1, 3))}, [np.zeros((1, 2))], 0.001, pid)
        results.append(rec.close_window())
    assert None in results and disk.failures >= 1
    assert rec.records_lost == results.count(None)
    stored = [s for s in results if s is not None]
    assert spool.pending() == stored
    disk.budget = 1 << 20  # space is freed
    seq = rec.close_window()
    assert seq is not None and seq > max(stored)
    # Every lost record is reported exactly once, in a later stored record.
    assert sum(r.spool.enospc for r in records(spool)) == results.count(None)
    assert records(spool)[-1].spool.enospc >= 1


def test_seq_increases_across_restarts_even_without_the_counter(tmp_path) -> None:
    spool = Spool(tmp_path / "spool", clock=lambda: 1000.0)
    assert spool.next_seq == 1_000_000  # a fresh spool starts at the clock in milliseconds
    rec = recorder(tmp_path, spool=spool)
    first = [rec.close_window() for _ in range(3)]
    assert first == [1_000_000, 1_000_001, 1_000_002]
    assert Spool(tmp_path / "spool", clock=lambda: 0.0).next_seq == 1_000_003  # from meta.json
    (tmp_path / "spool" / "meta.json").unlink()
    assert Spool(tmp_path / "spool", clock=lambda: 0.0).next_seq == 1_000_003  # from the files
    for seq in range(1_000_000, 1_000_003):
        spool.remove(seq)
    # Counter and records both gone: the clock (50 ms later) is still above every old seq.
    assert Spool(tmp_path / "spool", clock=lambda: 1000.05).next_seq == 1_000_050


class Ingest:
    """The server's telemetry ingester: persistent subscription, dedupe by (device, seq).

    Not a ``$share`` subscription: Mosquitto 2.0 does not restore shared
    subscriptions from its persistence file, so messages published after a
    broker restart and before the ingester re-subscribes would be acknowledged
    to the device and then dropped (docs/protocol.md, "Shared subscriptions").
    """

    def __init__(self, broker: Mosquitto) -> None:
        self.received: list[TelemetryRecord] = []
        self.raw: dict[int, set[bytes]] = {}
        self.lock = threading.Lock()
        self.conn = MqttConnection(
            MqttOptions(
                host=broker.host,
                port=broker.port,
                client_id="ingest-0",
                backoff_initial_s=0.05,
                backoff_max_s=0.3,
            ),
            on_message=self._on_message,
        )
        self.conn.subscribe(str(all_devices(DeviceChannel.TELEMETRY)))
        self.conn.start()
        assert self.conn.wait_connected(5)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        record = TelemetryRecord.from_bytes(payload)
        with self.lock:
            self.received.append(record)
            self.raw.setdefault(record.seq, set()).add(payload)

    def seqs(self) -> set[int]:
        with self.lock:
            return {r.seq for r in self.received if r.device_id == DEVICE}


class Agent:
    """The telemetry half of one agent process: connection, spool, recorder, publisher."""

    def __init__(self, broker: Mosquitto, state: Path, **kw) -> None:
        self.conn = MqttConnection(
            MqttOptions(
                host=broker.host,
                port=broker.port,
                client_id=DEVICE,
                backoff_initial_s=0.05,
                backoff_max_s=0.3,
                **kw,
            )
        )
        self.conn.start()
        self.spool = Spool(state / "spool")
        self.recorder = TelemetryRecorder(DEVICE, self.spool)
        self.publisher = TelemetryPublisher(
            self.spool, self.conn, str(DeviceTopic.telemetry(DEVICE)), ack_timeout_s=2
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while not self.stop.wait(0.02):
            self.publisher.pump()

    def window(self, n: int) -> int:
        for pid in range(n):
            self.recorder.observe({}, [], 0.001, pid)
        seq = self.recorder.close_window()
        assert seq is not None
        return seq

    def crash(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.conn.drop_connection()
        self.conn.stop(timeout_s=2)


def test_telemetry_survives_broker_and_agent_restarts(mosquitto, tmp_path) -> None:
    ingest = Ingest(mosquitto)
    state = tmp_path / "state"
    agent = Agent(mosquitto, state)
    assert agent.conn.wait_connected(5)
    produced = [agent.window(3) for _ in range(4)]
    assert wait_until(lambda: set(produced) <= ingest.seqs())

    mosquitto.stop()  # broker down: records pile up in the spool
    produced += [agent.window(2) for _ in range(4)]
    assert len(agent.spool) >= 4
    agent.crash()  # and the agent dies while they wait

    mosquitto.start()
    agent = Agent(mosquitto, state)  # restart: a fresh process on the same state dir
    assert agent.conn.wait_connected(5)
    produced += [agent.window(1) for _ in range(3)]
    mosquitto.restart()  # one more broker restart while records flow
    produced += [agent.window(1) for _ in range(3)]
    assert wait_until(lambda: set(produced) <= ingest.seqs(), 20), sorted(
        set(produced) - ingest.seqs()
    )
    assert wait_until(lambda: len(agent.spool) == 0)
    assert produced == sorted(produced) and len(set(produced)) == 14
    # Duplicates (a lost PUBACK, a resend after reconnect) are byte-identical.
    assert all(len(versions) == 1 for versions in ingest.raw.values())
    by_seq = {r.seq: r for r in ingest.received}
    assert sum(by_seq[s].predictions for s in produced) == 4 * 3 + 4 * 2 + 6
    agent.crash()
    ingest.conn.stop()


def test_permanent_puback_refusal_is_removed_and_counted(mosquitto_factory, tmp_path) -> None:
    acl = mosquitto_acl({}, server_users=[])
    broker = mosquitto_factory(users={DEVICE: "pw"}, acl=acl)
    opts = MqttOptions(
        host=broker.host,
        port=broker.port,
        client_id=DEVICE,
        username=DEVICE,
        password="pw",
        backoff_initial_s=0.05,
        backoff_max_s=0.3,
    )
    conn = MqttConnection(opts)
    conn.start()
    assert conn.wait_connected(5)
    spool = Spool(tmp_path / "spool")
    rec = TelemetryRecorder(DEVICE, spool)
    # Publishing to another device's topic is denied by the ACL (reason 0x87).
    pub = TelemetryPublisher(spool, conn, str(DeviceTopic.telemetry("pi-2")))
    rec.close_window()
    pub.pump()
    assert wait_until(lambda: pub.rejected == 1 and len(spool) == 0)
    rec.close_window()
    assert records(spool)[0].spool.rejected == 1
    conn.stop()


def test_options_are_bounded() -> None:
    with pytest.raises(ValueError):
        TelemetryOptions(window_s=0)
    with pytest.raises(ValueError):
        TelemetryOptions(sample_rate=1.5)
    with pytest.raises(ValueError):
        TelemetryOptions(samples_per_window=1000)


def test_channel_counts_over_edges_equal_searchsorted() -> None:
    """The comparison-per-edge histogram is ``bincount(searchsorted(side="right"))``."""
    from agent.telemetry.recorder import _count_over_edges

    rng = np.random.default_rng(3)
    edges = np.array([-1.0, -0.5, 0.0, 0.0, 0.25, 1.0, 2.0, 3.0, 3.5])  # a tie, like real deciles
    values = np.concatenate([rng.normal(size=5000), edges, edges + 1e-12, edges - 1e-12])
    got = _count_over_edges(values, edges, 10)
    want = np.bincount(np.searchsorted(edges, values, side="right"), minlength=10)
    assert got is not None and got.tolist() == want.tolist() and got.sum() == values.size
    for bad in (np.nan, np.inf, -np.inf):  # the caller masks and searches instead
        assert _count_over_edges(np.append(values, bad), edges, 10) is None
    assert _count_over_edges(values, edges[::-1].copy(), 10) is None  # not ascending
    assert _count_over_edges(values, edges, 11) is None  # edges do not fit the bins
    assert _count_over_edges(values[:0], edges, 10) is None
