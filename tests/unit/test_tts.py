import numpy as np
import pytest

from emo_lib import tts
from emo_lib.audio import frame_energy_db, prosody_summary

needs_espeak = pytest.mark.skipif(not __import__("shutil").which("espeak-ng"), reason="espeak-ng not installed")


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_refused(text):
    with pytest.raises(tts.TextError, match="empty"):
        tts.check_text(text)


def test_unspeakable_characters_are_named():
    with pytest.raises(tts.TextError) as err:
        tts.check_text("I love it \U0001F600 so much \u4f60\u597d")
    assert "\U0001F600" in str(err.value) and "\u4f60" in str(err.value)
    with pytest.raises(tts.TextError, match="no letters"):
        tts.check_text("?!")


def test_typography_is_normalised():
    assert tts.check_text("I\u2019m  here \u2014 really") == "I'm here , really"


def test_missing_espeak_says_how_to_install(monkeypatch):
    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    with pytest.raises(tts.TTSError) as err:
        tts.synthesize("Hello there.", "m1", tts.sample_prosody("neutral", np.random.default_rng(0)))
    message = str(err.value)
    assert "apt-get install espeak-ng" in message and "brew install" in message and "conda" in message


def test_jitter_is_seeded_and_scaled():
    a = tts.sample_prosody("anger", np.random.default_rng(1))
    b = tts.sample_prosody("anger", np.random.default_rng(1))
    assert a == b
    exact = tts.sample_prosody("anger", np.random.default_rng(1), jitter=0.0)
    assert exact["pitch"] == tts.PROFILES["anger"].pitch and exact["rate"] == tts.PROFILES["anger"].rate


@needs_espeak
def test_profiles_change_the_acoustics():
    """Sad speech must come out slower, lower and quieter than angry or surprised speech."""
    text = "They called me back about the job this morning."
    stats = {}
    for emotion in ("sadness", "anger", "surprise", "neutral"):
        values = []
        for speaker in ("m2", "f3"):
            wav = tts.synthesize(text, speaker, tts.sample_prosody(emotion, np.random.default_rng(0), jitter=0.0))
            values.append(prosody_summary(wav, tts.SAMPLE_RATE, len(text.split())))
        stats[emotion] = {k: np.mean([v[k] for v in values]) for k in values[0]}
    assert stats["sadness"]["rate_words_per_s"] < 0.8 * stats["anger"]["rate_words_per_s"]
    assert stats["sadness"]["f0_mean_hz"] < stats["neutral"]["f0_mean_hz"] < stats["surprise"]["f0_mean_hz"]
    assert stats["sadness"]["energy_db"] < stats["anger"]["energy_db"] - 3


@needs_espeak
def test_word_by_word_boundaries_are_exact():
    text = "I am so sorry, that sounds hard."
    wav, bounds = tts.synthesize_word_by_word(text, "f2", tts.sample_prosody("sadness", np.random.default_rng(0)))
    assert [b["word"] for b in bounds] == text.split()
    starts = [b["start_s"] for b in bounds]
    assert starts == sorted(starts)
    assert all(b["end_s"] > b["start_s"] for b in bounds)
    assert bounds[-1]["end_s"] <= len(wav) / tts.SAMPLE_RATE
    energy = frame_energy_db(wav, tts.SAMPLE_RATE)
    hop = 0.01
    for b, nxt in zip(bounds, bounds[1:]):  # sound inside words, silence between them
        inside = energy[int(b["start_s"] / hop) : int(b["end_s"] / hop)]
        gap = energy[int(b["end_s"] / hop) + 3 : int(nxt["start_s"] / hop) - 3]
        assert inside.max() > -40
        if gap.size:
            assert gap.max() < -60


@needs_espeak
def test_unknown_speaker_and_emotion():
    with pytest.raises(ValueError, match="unknown speaker"):
        tts.synthesize("Hello.", "zz", tts.sample_prosody("neutral", np.random.default_rng(0)))
    with pytest.raises(ValueError, match="unknown emotion"):
        tts.sample_prosody("boredom", np.random.default_rng(0))
