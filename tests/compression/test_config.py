"""Typed config objects: bounds and candidate expansion."""

from __future__ import annotations

import pytest

from compression.config import (
    CalibrationMethod,
    CompressConfig,
    DynamicInt8,
    Float16,
    GlobalMagnitudePruning,
    LatencyConfig,
    NoQuantization,
    QuantMode,
    StaticInt8,
    StructuredChannelPruning,
)
from compression.errors import ConfigError


@pytest.mark.parametrize(
    "build",
    [
        lambda: GlobalMagnitudePruning(0.0),
        lambda: GlobalMagnitudePruning(1.0),
        lambda: StructuredChannelPruning(0.95),
        lambda: StructuredChannelPruning(0.5, norm=3),
        lambda: StaticInt8(percentile=50.0),
        lambda: LatencyConfig(runs=1),
        lambda: CompressConfig(opset=12),
        lambda: CompressConfig(max_drop=-0.1),
        lambda: CompressConfig(zstd_level=30),
        lambda: CompressConfig(calibration_methods=()),
    ],
)
def test_config_out_of_bounds_raises(build):
    with pytest.raises(ConfigError):
        build()


def test_auto_never_offers_the_untouched_fp32_model():
    names = [c.name for c in CompressConfig().candidates()]
    assert "fp32" not in names
    assert names == ["fp16", "dynamic", "static-minmax", "static-entropy", "static-percentile"]


def test_auto_with_prune_tries_unpruned_and_pruned():
    config = CompressConfig(prune=GlobalMagnitudePruning(0.5))
    names = [c.name for c in config.candidates()]
    assert "prune0.5+fp32" in names and "prune0.5+static-minmax" in names
    assert "dynamic" in names
    assert len(names) == 5 + 6


def test_explicit_modes_give_only_their_family():
    static = CompressConfig(quant=QuantMode.STATIC, calibration_methods=(CalibrationMethod.MINMAX,))
    assert [type(c.quant) for c in static.candidates()] == [StaticInt8]
    assert [type(c.quant) for c in CompressConfig(quant=QuantMode.DYNAMIC).candidates()] == [
        DynamicInt8
    ]
    assert [type(c.quant) for c in CompressConfig(quant=QuantMode.FP16).candidates()] == [Float16]
    none = CompressConfig(quant=QuantMode.NONE, prune=GlobalMagnitudePruning(0.3)).candidates()
    assert [(type(c.quant), c.prune) for c in none] == [
        (NoQuantization, GlobalMagnitudePruning(0.3))
    ]


def test_candidate_names_mark_excluded_nodes():
    quant = StaticInt8(exclude_nodes=("a", "b"))
    assert quant.label == "static-minmax-excl2"
