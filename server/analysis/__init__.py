"""The analysis core: pure decisions about drift and model quality from telemetry aggregates.

- ``verdict``: ``Status`` (ok / warn / alarm / insufficient) and the bounded
  ``Thresholds``;
- ``drift``: PSI, Jensen-Shannon, binned KS and chi-square from histograms on
  the reference's edges, sample-size-aware thresholds, the Benjamini-Hochberg
  step across a family of (device, feature) tests, and roll-ups by summing
  counts.

Counts and a configuration go in, numbers and verdicts come out: no database,
no clock, no I/O (the periodic evaluation and the alert rows live around it).
docs/drift.md writes the formulas out.
"""
