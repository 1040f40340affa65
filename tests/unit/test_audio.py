import numpy as np
import pytest
import soundfile as sf

from emo_lib.audio import AudioError, estimate_f0, load_audio, prepare_audio, prosody_summary, save_wav


def tone(freq=150.0, seconds=1.0, sr=16000, amplitude=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_other_sample_rate_is_resampled(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(sr=44100), 44100)
    wav, sr = load_audio(path, target_sr=16000)
    assert sr == 16000 and abs(len(wav) - 16000) <= 1


def test_stereo_is_downmixed(tmp_path):
    path = tmp_path / "s.wav"
    stereo = np.stack([tone(), tone()], axis=1)
    sf.write(path, stereo, 16000)
    wav, _ = load_audio(path)
    assert wav.ndim == 1 and np.allclose(wav, tone(), atol=1e-3)


def test_empty_silent_long_and_missing_audio_are_clear_errors(tmp_path):
    with pytest.raises(AudioError, match="empty"):
        prepare_audio(np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="silent"):
        prepare_audio(np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioError, match="limit of 2.0 s"):
        prepare_audio(tone(seconds=3), 16000, max_seconds=2.0)
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF1234WAVEnot really")
    with pytest.raises(AudioError, match="cannot read"):
        load_audio(bad)


def test_save_wav_roundtrip(tmp_path):
    save_wav(tmp_path / "x.wav", tone(), 16000)
    wav, sr = load_audio(tmp_path / "x.wav")
    assert sr == 16000 and np.abs(wav - tone()).max() < 1e-3


@pytest.mark.parametrize("freq", [90.0, 150.0, 230.0, 380.0])
def test_f0_of_a_harmonic_tone(freq):
    sr = 22050
    t = np.arange(sr) / sr
    wav = sum(np.sin(2 * np.pi * k * freq * t) / k for k in (1, 2, 3)).astype(np.float32) * 0.3
    f0 = estimate_f0(wav, sr)
    voiced = f0[np.isfinite(f0)]
    assert voiced.size > 0.8 * f0.size
    assert abs(np.median(voiced) - freq) / freq < 0.02  # no octave errors


def test_noise_is_mostly_unvoiced():
    rng = np.random.default_rng(0)
    f0 = estimate_f0((0.3 * rng.standard_normal(22050)).astype(np.float32), 22050)
    assert np.isfinite(f0).mean() < 0.2


def test_prosody_summary_rate():
    sr = 16000
    wav = np.concatenate([np.zeros(sr // 2), tone(seconds=2.0, sr=sr), np.zeros(sr // 2)]).astype(np.float32)
    stats = prosody_summary(wav, sr, n_words=6)
    assert abs(stats["speech_s"] - 2.0) < 0.1
    assert abs(stats["rate_words_per_s"] - 3.0) < 0.2
    assert abs(stats["f0_mean_hz"] - 150) < 3
