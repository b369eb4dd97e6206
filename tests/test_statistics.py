"""Feature statistics (issue 35): what tasks compute as they write merges to what one pass over
all rows gives, and the distances behave as TFDV defines them."""

from __future__ import annotations

import numpy as np
import pytest

from twocluster.store import statistics


def test_merged_task_parts_equal_one_pass_over_every_row():
    rng = np.random.default_rng(3)
    features = rng.normal(-4.0, 2.0, size=(300, 98, 40)).astype(np.float32)
    features[5, 4, 7] = np.nan  # at sampled positions (every SAMPLE_EVERY-th frame)
    features[6, 8, 8] = np.inf
    parts = [statistics.partial(chunk, "log_mel", "log_mel") for chunk in np.array_split(features, 7)]
    merged = statistics.merge(parts)
    whole = statistics.partial(features, "log_mel", "log_mel").finish()
    assert merged.rows == whole.rows == 300
    for a, b in zip(merged.channels, whole.channels, strict=True):
        assert a.histogram == b.histogram and (a.count, a.nan, a.inf, a.min, a.max) == (b.count, b.nan, b.inf, b.min, b.max)
        assert a.mean == pytest.approx(b.mean) and a.std == pytest.approx(b.std)
    sampled = features[:, :: statistics.SAMPLE_EVERY]
    finite = np.where(np.isfinite(sampled), sampled, np.nan).reshape(-1, 40)
    assert np.allclose([c.mean for c in merged.channels], np.nanmean(finite, axis=0), atol=1e-4)
    assert np.allclose([c.std for c in merged.channels], np.nanstd(finite, axis=0), atol=1e-3)
    assert merged.channels[7].nan == 1 and merged.channels[8].inf == 1
    assert sum(merged.channels[0].histogram) == merged.channels[0].count == 300 * len(range(0, 98, statistics.SAMPLE_EVERY))
    # Values outside the edges land in the end bins, never lost.
    loud = statistics.partial(np.full((2, 3, 40), 50.0, np.float32), "log_mel", "log_mel").finish()
    assert loud.channels[0].histogram[-1] == 6


def test_distances():
    p = np.array([[10, 0, 0], [5, 5, 0]], dtype=float)
    assert statistics.jensen_shannon(p, p).tolist() == [0.0, 0.0]
    assert statistics.jensen_shannon(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))[0] == pytest.approx(1.0)
    assert statistics.l_infinity({"yes": 50, "no": 50}, {"yes": 80, "no": 20}) == pytest.approx(0.3)
    quiet = statistics.partial(np.random.default_rng(1).normal(-10, 1, (50, 98, 40)).astype(np.float32), "log_mel", "log_mel").finish()
    same = statistics.partial(np.random.default_rng(2).normal(-10, 1, (50, 98, 40)).astype(np.float32), "log_mel", "log_mel").finish()
    louder = statistics.partial(np.random.default_rng(2).normal(-6, 1, (50, 98, 40)).astype(np.float32), "log_mel", "log_mel").finish()
    assert statistics.feature_skew(same, quiet) < 0.01 < 0.5 < statistics.feature_skew(louder, quiet)
    combined = statistics.combine([quiet, same])
    assert combined.rows == 100 and combined.channels[0].mean == pytest.approx((quiet.channels[0].mean + same.channels[0].mean) / 2)
