"""Emotional multi-speaker speech with espeak-ng.

The paper synthesizes its dialogues with CosyVoice2's instruct TTS; offline on a CPU the kit uses
espeak-ng, whose SSML ``<prosody>`` controls (pitch level, pitch range, rate, volume), ``<break>``
and ``<emphasis>`` are enough to give each emotion a recognisable acoustic profile. These are
caricatures of emotional speech, not natural emotion: the notebooks say so.

Each utterance draws its prosody from its emotion's profile with random jitter, so the classes
overlap a little, as in life. A word-by-word mode synthesizes every word alone and concatenates
them, which records exact word boundaries: the ground truth for checking the DTW alignment.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .audio import speech_bounds

SAMPLE_RATE = 22050  # espeak-ng's output rate, also the vocoder's
# espeak-ng's default 175 words/min is brisk; at 88 % of it Whisper tiny.en's word error rate on the
# kit's sentences drops (mean 0.25 -> 0.19 on 36 sentences), so every profile's rate is relative to this.
BASE_RATE = 0.88

# Speakers: espeak-ng voice variants (different formants, pitch and breathiness). Ids name the gender.
SPEAKERS = {
    "m1": "en-us+m1", "m2": "en-us+m2", "m3": "en-us+m3", "m4": "en-us+m4", "m5": "en-us+m7",
    "f1": "en-us+f1", "f2": "en-us+f2", "f3": "en-us+f3", "f4": "en-us+f4", "f5": "en-us+f5",
}


@dataclass(frozen=True)
class ProsodyProfile:
    """One emotion's speaking style.

    pitch: pitch level, percent change from the voice's default (+50 raises F0 by about a quarter);
    range: pitch range (intonation swing), percent of default; rate: speed, percent of default;
    volume: loudness, percent of default; comma_pause_ms: silence at commas; hesitation: chance of
    a short pause after any word; emphasis: 0 none, 1 one moderately stressed word, 2 two strongly
    stressed words.
    """

    pitch: float
    range: float
    rate: float
    volume: float
    comma_pause_ms: float
    hesitation: float
    emphasis: int


# Chosen from the speech-emotion literature's usual acoustic correlates (Scherer 2003; Murray &
# Arnott 1993): joy and surprise raise pitch level and range; anger is loud, fast, stressed; fear is
# high, fast, narrow and halting; sadness is low, slow, quiet, flat, with long pauses; disgust is
# low, slow, with drawn-out stressed words.
PROFILES = {
    "neutral": ProsodyProfile(pitch=0, range=100, rate=100, volume=100, comma_pause_ms=150, hesitation=0.0, emphasis=0),
    "happiness": ProsodyProfile(pitch=35, range=170, rate=112, volume=125, comma_pause_ms=100, hesitation=0.0, emphasis=1),
    "anger": ProsodyProfile(pitch=10, range=140, rate=118, volume=160, comma_pause_ms=60, hesitation=0.0, emphasis=2),
    "fear": ProsodyProfile(pitch=45, range=60, rate=128, volume=80, comma_pause_ms=250, hesitation=0.15, emphasis=0),
    "sadness": ProsodyProfile(pitch=-25, range=40, rate=75, volume=60, comma_pause_ms=450, hesitation=0.10, emphasis=0),
    "disgust": ProsodyProfile(pitch=-15, range=120, rate=82, volume=105, comma_pause_ms=300, hesitation=0.05, emphasis=1),
    "surprise": ProsodyProfile(pitch=60, range=200, rate=106, volume=135, comma_pause_ms=120, hesitation=0.0, emphasis=1),
}

ALLOWED_CHARACTERS = re.compile(r"[A-Za-z0-9 ,.!?'\-]")
_REPLACEMENTS = {"\u2019": "'", "\u2018": "'", "\u201c": "", "\u201d": "", "\u2014": ", ", "\u2013": "-", ";": ",", ":": ","}


class TTSError(RuntimeError):
    """espeak-ng is missing or failed."""


class TextError(ValueError):
    """Text that cannot be spoken (empty, or characters espeak-ng cannot say)."""


def espeak_binary() -> str:
    """Path of espeak-ng, or a TTSError saying how to install it."""
    found = shutil.which("espeak-ng")
    if not found:
        raise TTSError(
            "espeak-ng is not installed; the kit synthesizes its emotional speech with it. Install it with\n"
            "  Debian/Ubuntu:  sudo apt-get install espeak-ng\n"
            "  macOS:          brew install espeak-ng\n"
            "  conda:          conda install -c conda-forge espeak-ng\n"
            "(`make setup` does the apt install when run as root)."
        )
    return found


def check_text(text: str) -> str:
    """Normalise typographic characters and refuse text espeak-ng cannot speak, naming the culprits."""
    if text is None or not str(text).strip():
        raise TextError("the text is empty (or only whitespace): there is nothing to speak")
    text = str(text)
    for bad, good in _REPLACEMENTS.items():
        text = text.replace(bad, good)
    text = re.sub(r"\s+", " ", text).strip()
    unknown = sorted({c for c in text if not ALLOWED_CHARACTERS.match(c)})
    if unknown:
        raise TextError(
            f"cannot speak the characters {' '.join(repr(c) for c in unknown)} in {text!r}: "
            "use letters, digits, spaces and , . ! ? ' - only"
        )
    if not re.search(r"[A-Za-z0-9]", text):
        raise TextError(f"{text!r} has no letters or digits to speak")
    return text


def sample_prosody(emotion: str, rng: np.random.Generator, jitter: float = 1.0) -> dict:
    """One utterance's prosody: the emotion's profile with random jitter (scaled by ``jitter``)."""
    if emotion not in PROFILES:
        raise ValueError(f"unknown emotion '{emotion}'; known: {', '.join(PROFILES)}")
    p = PROFILES[emotion]
    n = lambda s: float(rng.normal(0.0, s * jitter))  # noqa: E731
    return {
        "emotion": emotion,
        "pitch": p.pitch + n(8.0),
        "range": p.range * float(np.exp(n(0.15))),
        "rate": p.rate * float(np.exp(n(0.07))),
        "volume": p.volume * float(np.exp(n(0.12))),
        "comma_pause_ms": p.comma_pause_ms * float(np.exp(n(0.25))),
        "hesitation": p.hesitation,
        "emphasis": p.emphasis,
        "seed": int(rng.integers(0, 2**31 - 1)),
    }


def _prosody_open(prosody: dict) -> str:
    return (
        f'<prosody pitch="{prosody["pitch"]:+.0f}%" range="{prosody["range"]:.0f}%" '
        f'rate="{prosody["rate"] * BASE_RATE:.0f}%" volume="{prosody["volume"]:.0f}%">'
    )


def _emphasised_words(words: list[str], prosody: dict) -> set[int]:
    """Indices of stressed words: the longest content words, chosen reproducibly."""
    if prosody["emphasis"] <= 0:
        return set()
    rng = np.random.default_rng(prosody["seed"])
    lengths = np.array([len(re.sub(r"[^A-Za-z]", "", w)) for w in words], dtype=float)
    lengths += rng.uniform(0, 0.5, len(words))  # break ties at random
    return set(np.argsort(-lengths)[: prosody["emphasis"]].tolist())


def _pauses_after(words: list[str], prosody: dict) -> list[float]:
    """Silence (ms) after each word: commas get the profile's pause, some words a hesitation."""
    rng = np.random.default_rng(prosody["seed"] + 1)
    pauses = []
    for i, w in enumerate(words):
        ms = 0.0
        if w.endswith(","):
            ms = prosody["comma_pause_ms"]
        elif i < len(words) - 1 and rng.random() < prosody["hesitation"]:
            ms = float(rng.uniform(150, 350))
        pauses.append(ms)
    return pauses


def to_ssml(text: str, prosody: dict) -> str:
    """SSML for one utterance: a prosody envelope, emphasis on chosen words, breaks for pauses."""
    words = check_text(text).split(" ")
    stressed = _emphasised_words(words, prosody)
    level = "strong" if prosody["emphasis"] >= 2 else "moderate"
    parts = []
    for i, (w, pause) in enumerate(zip(words, _pauses_after(words, prosody))):
        parts.append(f'<emphasis level="{level}">{w}</emphasis>' if i in stressed else w)
        if pause > 0:
            parts.append(f'<break time="{pause:.0f}ms"/>')
    return f"<speak>{_prosody_open(prosody)}{' '.join(parts)}</prosody></speak>"


def _run_espeak(ssml: str, voice: str) -> np.ndarray:
    binary = espeak_binary()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        result = subprocess.run([binary, "-v", voice, "-m", "-w", str(out), ssml], capture_output=True, text=True)
        if result.returncode != 0 or not out.exists():
            raise TTSError(f"espeak-ng failed for voice {voice}: {result.stderr.strip()[:300]}")
        wav, sr = sf.read(str(out), dtype="float32")
    if sr != SAMPLE_RATE:
        raise TTSError(f"espeak-ng wrote {sr} Hz, expected {SAMPLE_RATE} Hz")
    return wav


def synthesize(text: str, speaker: str, prosody: dict) -> np.ndarray:
    """Speak ``text`` in one go: float32 waveform at 22.05 kHz."""
    if speaker not in SPEAKERS:
        raise ValueError(f"unknown speaker '{speaker}'; known: {', '.join(SPEAKERS)}")
    wav = _run_espeak(to_ssml(text, prosody), SPEAKERS[speaker])
    if wav.size == 0 or np.abs(wav).max() < 1e-3:
        raise TTSError(f"espeak-ng produced no sound for {text!r}")
    return wav


def synthesize_word_by_word(text: str, speaker: str, prosody: dict, gap_ms: float = 45.0) -> tuple[np.ndarray, list[dict]]:
    """Speak each word alone and concatenate: waveform plus exact word boundaries (seconds).

    Each word keeps its trailing punctuation so sentence-final intonation survives. Leading and
    trailing silence of each word is trimmed; words are joined by a short gap (scaled by the rate)
    plus the utterance's pauses. The price is choppier prosody than whole-sentence synthesis.
    """
    if speaker not in SPEAKERS:
        raise ValueError(f"unknown speaker '{speaker}'; known: {', '.join(SPEAKERS)}")
    words = check_text(text).split(" ")
    stressed = _emphasised_words(words, prosody)
    level = "strong" if prosody["emphasis"] >= 2 else "moderate"
    gap = gap_ms * 100.0 / prosody["rate"]
    pieces, boundaries, cursor = [], [], int(0.1 * SAMPLE_RATE)
    pieces.append(np.zeros(cursor, dtype=np.float32))
    for i, (w, pause) in enumerate(zip(words, _pauses_after(words, prosody))):
        body = f'<emphasis level="{level}">{w}</emphasis>' if i in stressed else w
        wav = _run_espeak(f"<speak>{_prosody_open(prosody)}{body}</prosody></speak>", SPEAKERS[speaker])
        start, end = speech_bounds(wav, SAMPLE_RATE, threshold_db=-35.0)
        word = wav[start:end].astype(np.float32)
        if word.size == 0:
            raise TTSError(f"espeak-ng produced no sound for the word {w!r}")
        boundaries.append({"word": w, "start_s": cursor / SAMPLE_RATE, "end_s": (cursor + len(word)) / SAMPLE_RATE})
        silence = np.zeros(int((gap + pause) / 1000 * SAMPLE_RATE), dtype=np.float32)
        pieces += [word, silence]
        cursor += len(word) + len(silence)
    pieces.append(np.zeros(int(0.1 * SAMPLE_RATE), dtype=np.float32))
    return np.concatenate(pieces), boundaries
