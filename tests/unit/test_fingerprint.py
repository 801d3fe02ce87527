"""The fingerprint's intensity statistics: nnU-Net's with-replacement draws, counted instead of materialised."""

from __future__ import annotations

import numpy as np
import pytest

from viseg.planning.fingerprint import FOREGROUND_SAMPLE_SEED, _foreground_samples, intensity_statistics


def nnunet_draws(image: np.ndarray, foreground: np.ndarray, num_samples: int) -> list[np.ndarray]:
    """What nnU-Net's DatasetFingerprintExtractor.collect_foreground_intensities draws, as arrays."""
    rs = np.random.RandomState(FOREGROUND_SAMPLE_SEED)
    return [rs.choice(channel[foreground], num_samples, replace=True) if foreground.any() else channel[:0].ravel()
            for channel in image]


@pytest.mark.parametrize("num_samples", [1, 7, 5000, 2_000_000])
def test_counted_statistics_equal_numpys_on_the_drawn_arrays(num_samples: int):
    rng = np.random.default_rng(num_samples)
    cases = [(rng.normal(100, 30, (2, 5, 16, 16)).astype(np.float32), rng.random((5, 16, 16)) > 0.7)
             for _ in range(3)]
    counted = [_foreground_samples(image, foreground, num_samples) for image, foreground in cases]
    drawn = [nnunet_draws(image, foreground, num_samples) for image, foreground in cases]
    for channel in range(2):
        ours = intensity_statistics([case[channel] for case in counted])
        samples = np.concatenate([case[channel] for case in drawn])
        p005, median, p995 = np.percentile(samples, [0.5, 50.0, 99.5])
        expected = {"mean": np.mean(samples), "median": median, "std": np.std(samples), "min": samples.min(),
                    "max": samples.max(), "percentile_99_5": p995, "percentile_00_5": p005}
        for key, value in expected.items():
            assert ours[key] == pytest.approx(float(value), rel=1e-6), key
        assert sum(int(case[channel].counts.sum()) for case in counted) == samples.size


def test_a_channel_without_foreground_gives_nan_statistics():
    image = np.ones((1, 4, 4, 4), np.float32)
    empty = _foreground_samples(image, np.zeros((4, 4, 4), bool), 100)
    assert all(np.isnan(v) for v in intensity_statistics([empty[0]]).values())
    assert all(np.isnan(v) for v in intensity_statistics([]).values())
