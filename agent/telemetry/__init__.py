"""Telemetry: per-prediction observations -> windowed records -> disk spool -> broker.

Flow:

1. Hot path. ``TelemetryRecorder.observe(inputs, outputs, latency_s,
   prediction_id)`` is the agent core's observer. It appends one tuple of
   *references* to a bounded deque and increments a counter: O(1), no lock,
   no numpy. When the deque is full the oldest observation is dropped and the
   drop is counted (``dropped_observations``). Callers must not mutate the
   arrays they passed afterwards.
2. Aggregation, off the hot path (the recorder's thread every
   ``aggregate_interval_s``, or ``aggregate()``): drained observations are
   binned in vectorized batches over the manifest's drift-reference edges
   (bin = ``searchsorted(edges, v, side="right")``, non-finite values counted
   apart), latencies kept for quantiles, outputs summarised (moments and argmax
   class counts), feedback labels joined with the predicted class, and sampled
   raw inputs encoded (sampling is off by default and capped per window). A
   batch whose observations all carry arrays of one dtype and trailing shape
   is stacked with one concatenation per input and output; any other batch is
   taken observation by observation. Both give byte-identical records.
3. Window close (every ``window_s``): one ``TelemetryRecord`` with the next
   per-device ``seq`` is written to the ``Spool`` *first* (one file per record,
   atomic write + fsync), never straight to the network.
4. ``TelemetryPublisher.pump()`` publishes spooled records with QoS 1 and
   deletes a record only when the broker's PUBACK says success (MQTT 5 reason
   code < 0x80). A permanent refusal (e.g. not authorized) deletes and counts
   it; any other failure, a disconnect or a missing PUBACK leaves it for a
   later attempt. So a record can arrive twice (receivers dedupe on
   ``(device_id, seq)``) but is lost only by the documented bounds.

Invariants: ``seq`` strictly increases per device across restarts (the next
value is persisted before the record is written; if the counter file is lost
it restarts above both the spooled records and the current Unix time in
milliseconds); the spool never exceeds ``max_records``/``max_bytes`` (the
oldest records are evicted and counted, and the count is reported in the next
record); a full disk (ENOSPC) or another I/O error while spooling is counted
and reported, never raised: the agent keeps serving.
"""

from __future__ import annotations

from agent.telemetry.binning import bin_matrix
from agent.telemetry.options import TelemetryOptions
from agent.telemetry.publisher import AckPublisher, TelemetryPublisher
from agent.telemetry.recorder import TelemetryRecorder
from agent.telemetry.spool import Spool
from agent.telemetry.vitals import VitalsProbe

__all__ = [
    "AckPublisher",
    "Spool",
    "TelemetryOptions",
    "TelemetryPublisher",
    "TelemetryRecorder",
    "VitalsProbe",
    "bin_matrix",
]
