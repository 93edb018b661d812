"""Regressions from the seventh audit of ``store_ops``, each named after its defect."""

from __future__ import annotations

import math

import torch

from lmcache_core.store_ops import value_stats


def test_value_statistics_of_huge_finite_values_stay_finite() -> None:
    """The sums behind mean and std overflowed: a float64 chunk of 1.5e308 showed
    ``mean / std  inf / inf`` (and ``null`` in JSON) though every value was finite."""
    stats = value_stats(torch.full((4, 8), 1.5e308, dtype=torch.float64))["all"]
    assert stats["mean"] == 1.5e308 and stats["std"] == 0.0
    mixed = torch.tensor([1.7e308, -1.7e308, 1.7e308, -1.7e308], dtype=torch.float64)
    stats = value_stats(mixed)["all"]
    assert stats["mean"] == 0.0 and math.isclose(stats["std"], 1.7e308, rel_tol=1e-12)


def test_value_statistics_are_unchanged_for_ordinary_values() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 16, 2, 8, generator=g).to(torch.bfloat16)
    stats = value_stats(x, per_layer=True)
    f64 = x.to(torch.float64)
    # Exactly as before: only sums that overflow are scaled.
    assert stats["all"]["mean"] == float(f64.mean())
    assert stats["all"]["std"] == float(f64.std(unbiased=False))
    assert stats["all"]["min"] == float(f64.min()) and stats["all"]["max"] == float(f64.max())
    assert len(stats["layers"]) == 2
    zeros = value_stats(torch.zeros(8))["all"]
    assert (zeros["mean"], zeros["std"], zeros["min"], zeros["max"]) == (0.0, 0.0, 0.0, 0.0)
