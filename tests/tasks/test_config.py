from __future__ import annotations

import pytest

from tasks.config import FeatureConfig
from tasks.errors import ParameterError


def test_defaults_match_the_design():
    c = FeatureConfig()
    assert (c.sample_rate, c.n_fft, c.hop_length, c.n_mels, c.n_mfcc, c.n_chroma) == (
        22050, 2048, 512, 128, 20, 12)
    assert c.segment_frames == 129  # round(3.0 * 22050 / 512)
    assert c.contrast_bands + 1 == 7


def test_feature_set_id_is_stable_and_sensitive():
    a, b = FeatureConfig(), FeatureConfig()
    assert a.feature_set_id == b.feature_set_id
    assert a.feature_set_id.startswith("fs-") and len(a.feature_set_id) == 15
    assert FeatureConfig(n_mels=64).feature_set_id != a.feature_set_id


def test_round_trip_through_dict():
    c = FeatureConfig(segment_s=5.0, fmax=8000.0)
    assert FeatureConfig.from_dict(c.to_dict()) == c


def test_unknown_key_is_rejected():
    with pytest.raises(ParameterError, match="unknown feature config keys"):
        FeatureConfig.from_dict({"n_melz": 64})


@pytest.mark.parametrize("kwargs, message", [
    ({"sample_rate": 0}, "sample_rate"),
    ({"hop_length": 4096}, "hop_length"),
    ({"n_mfcc": 200}, "n_mfcc"),
    ({"min_tail_s": 5.0}, "min_tail_s"),
    ({"resample_quality": "best"}, "resample_quality"),
    ({"sample_rate": 8000, "contrast_bands": 6}, "Nyquist"),
])
def test_invalid_values_raise(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        FeatureConfig(**kwargs)
