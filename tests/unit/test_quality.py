"""emo_lib.quality: the packaged MOS stand-in (DistillMOS) on synthetic voiced signals."""
import numpy as np
import pytest

from emo_lib import quality


def voiced(sr: int, seconds: float = 3.0) -> np.ndarray:
    """A clean voiced-speech-like signal: a harmonic series on a gliding F0, syllable-like amplitude."""
    t = np.arange(int(sr * seconds)) / sr
    f0 = 140 * (1 + 0.1 * np.sin(2 * np.pi * 1.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 15)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    return (0.3 * wav / np.abs(wav).max()).astype(np.float32)


@pytest.fixture(scope="module")
def predictor():
    return quality.load_mos_predictor("distillmos")


def test_noise_scores_lower_and_shapes(predictor):
    clean = voiced(16000)
    noisy = clean + 0.3 * np.random.default_rng(0).standard_normal(clean.size).astype(np.float32)
    scores = quality.predict_mos(predictor, [clean, noisy], 16000)
    assert scores.shape == (2,) and scores.dtype == np.float64
    assert np.all((scores >= 1.0) & (scores <= 5.0))
    assert scores[1] < scores[0] - 0.2, scores
    assert quality.predict_mos(predictor, [], 16000).shape == (0,)


def test_other_sample_rates_are_resampled(predictor):
    at16 = quality.predict_mos(predictor, [voiced(16000)], 16000)[0]
    at22 = quality.predict_mos(predictor, [voiced(22050)], 22050)[0]
    assert abs(at16 - at22) < 0.15, (at16, at22)
    clip = quality.prepare_clip(voiced(22050, 1.0), 22050, predictor, 0)
    assert clip.dtype == np.float32 and len(clip) == 16000


def test_bad_clips_name_their_index(predictor):
    good = voiced(16000, 1.0)
    cases = {
        "empty": np.zeros(0, dtype=np.float32),
        "silent": np.zeros(16000, dtype=np.float32),
        "NaN": np.full(16000, np.nan, dtype=np.float32),
        "less than the 0.5 s": good[:4000],
    }
    for words, bad in cases.items():
        with pytest.raises(ValueError, match=r"wavs\[1\]") as caught:
            quality.predict_mos(predictor, [good, bad], 16000)
        assert words in str(caught.value), str(caught.value)
    with pytest.raises(ValueError, match="list of clips"):
        quality.predict_mos(predictor, good, 16000)


def test_loud_clips_are_scaled_not_refused(predictor):
    clip = quality.prepare_clip(voiced(16000, 1.0) * 10, 16000, predictor, 0)
    assert np.isclose(np.abs(clip).max(), 1.0)


def test_unknown_predictor_lists_the_valid_ones():
    with pytest.raises(ValueError, match="distillmos, dnsmos"):
        quality.load_mos_predictor("utmos")


def test_dnsmos_when_installed():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("librosa")
    pytest.importorskip("speechmos")
    dns = quality.load_mos_predictor("dnsmos")
    clean = voiced(16000)
    noisy = clean + 0.3 * np.random.default_rng(0).standard_normal(clean.size).astype(np.float32)
    scores = quality.predict_mos(dns, [clean, noisy], 16000)
    assert scores.shape == (2,) and scores[1] < scores[0]
