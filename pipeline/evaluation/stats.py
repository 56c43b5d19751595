"""Paired comparisons of two variants on the same questions (scipy for the statistics)."""
from __future__ import annotations


def paired_bootstrap(a: list[float], b: list[float], seed: int = 0, resamples: int = 10_000) -> dict:
    """Mean of ``a - b`` over paired questions with a 95% percentile bootstrap interval
    (questions resampled with their pair kept together). Too few pairs: no interval."""
    import numpy as np
    from scipy.stats import bootstrap

    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    result = {"n": int(len(diffs)), "difference": round(float(diffs.mean()), 4) if len(diffs) else None,
              "low": None, "high": None}
    if len(diffs) < 2 or np.all(diffs == diffs[0]):
        if len(diffs):
            result["low"] = result["high"] = result["difference"]
        return result
    interval = bootstrap((diffs,), np.mean, confidence_level=0.95, n_resamples=resamples,
                         method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    result.update(low=round(float(interval.low), 4), high=round(float(interval.high), 4))
    return result


def sign_test(lost: int, gained: int) -> float:
    """Two-sided exact sign test on the questions that changed (1.0 when none did)."""
    from scipy.stats import binomtest

    n = lost + gained
    return round(float(binomtest(min(lost, gained), n, 0.5).pvalue), 3) if n else 1.0
