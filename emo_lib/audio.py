"""Audio I/O, validation, resampling and prosody measurements (F0, energy, rate).

I/O goes through ``soundfile`` (torchaudio's loaders need FFmpeg through torchcodec). Every
loader validates its input and says what is wrong: an empty file, a silent file or an over-long
file is an error; another sample rate is resampled and stereo is downmixed, both silently
corrected because they lose nothing the kit needs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from .paths import atomic_path

SILENCE_PEAK = 1e-3  # a peak below this (about -60 dBFS) counts as silent


class AudioError(ValueError):
    """Audio that the kit cannot use (empty, silent, too long, unreadable)."""


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling (windowed sinc, torchaudio) of a 1-D float signal."""
    if sr_in == sr_out:
        return np.asarray(wav, dtype=np.float32)
    import torch
    import torchaudio.functional as AF

    out = AF.resample(torch.as_tensor(np.asarray(wav, dtype=np.float32)), int(sr_in), int(sr_out))
    return out.numpy().astype(np.float32)


def prepare_audio(
    wav: np.ndarray,
    sr: int,
    target_sr: int | None = None,
    max_seconds: float | None = None,
    name: str = "audio",
) -> tuple[np.ndarray, int]:
    """Validate and normalise a signal: mono float32 at ``target_sr``.

    - 2-D input (samples x channels, as soundfile returns, or channels x samples) is averaged to mono;
    - another sample rate is resampled to ``target_sr``;
    - empty, silent (peak < 1e-3), non-finite or longer than ``max_seconds`` input raises AudioError.
    """
    wav = np.asarray(wav)
    if wav.ndim == 2:
        channel_axis = 1 if wav.shape[1] <= 8 and wav.shape[0] > wav.shape[1] else 0
        wav = wav.mean(axis=channel_axis)
    if wav.ndim != 1:
        raise AudioError(f"{name}: expected mono or stereo audio, got an array of shape {wav.shape}")
    if np.issubdtype(wav.dtype, np.integer):
        wav = wav.astype(np.float32) / float(np.iinfo(wav.dtype).max)
    wav = wav.astype(np.float32)
    if wav.size == 0:
        raise AudioError(f"{name}: the audio is empty (0 samples)")
    if not np.all(np.isfinite(wav)):
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    if float(np.abs(wav).max()) < SILENCE_PEAK:
        raise AudioError(f"{name}: the audio is silent (peak {np.abs(wav).max():.1e} < {SILENCE_PEAK:.0e})")
    duration = wav.size / sr
    if max_seconds is not None and duration > max_seconds:
        raise AudioError(
            f"{name}: the audio lasts {duration:.1f} s, more than the limit of {max_seconds:.1f} s; "
            "cut it into shorter pieces or raise the limit"
        )
    if target_sr is not None and sr != target_sr:
        wav, sr = resample(wav, sr, target_sr), target_sr
    return wav, sr


def load_audio(
    path: str | Path, target_sr: int | None = None, max_seconds: float | None = None
) -> tuple[np.ndarray, int]:
    """Read a sound file as mono float32, resampled to ``target_sr`` if given (validated)."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such audio file")
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as err:  # soundfile raises its own error types
        raise AudioError(f"{path}: cannot read audio ({err})") from err
    return prepare_audio(wav, sr, target_sr, max_seconds, name=str(path))


def save_wav(path: str | Path, wav: np.ndarray, sr: int) -> Path:
    """Write 16-bit PCM wav atomically (a crash never leaves a truncated file)."""
    wav = np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), wav, int(sr), subtype="PCM_16", format="WAV")
    return Path(path)


def frame_signal(wav: np.ndarray, frame_length: int, hop: int) -> np.ndarray:
    """(n_frames, frame_length) view, zero-padded at the end so every sample is covered."""
    n_frames = max(1, 1 + int(np.ceil((len(wav) - frame_length) / hop))) if len(wav) > frame_length else 1
    needed = (n_frames - 1) * hop + frame_length
    padded = np.pad(wav, (0, max(0, needed - len(wav))))
    index = np.arange(frame_length)[None, :] + hop * np.arange(n_frames)[:, None]
    return padded[index]


def frame_energy_db(wav: np.ndarray, sr: int, hop_s: float = 0.01, frame_s: float = 0.025) -> np.ndarray:
    """RMS energy per frame in dBFS."""
    frames = frame_signal(wav, int(frame_s * sr), int(hop_s * sr))
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    return (20 * np.log10(rms)).astype(np.float32)


def speech_bounds(wav: np.ndarray, sr: int, threshold_db: float = -40.0) -> tuple[int, int]:
    """First and last sample of speech: frames within ``threshold_db`` of the loudest frame."""
    hop = int(0.01 * sr)
    energy = frame_energy_db(wav, sr)
    active = np.flatnonzero(energy > energy.max() + threshold_db)
    if active.size == 0:
        return 0, len(wav)
    start = int(active[0] * hop)
    end = int(min(len(wav), (active[-1] + 1) * hop + int(0.025 * sr)))
    return start, end


def trim_silence(wav: np.ndarray, sr: int, threshold_db: float = -40.0, pad_s: float = 0.0) -> np.ndarray:
    start, end = speech_bounds(wav, sr, threshold_db)
    pad = int(pad_s * sr)
    return wav[max(0, start - pad) : min(len(wav), end + pad)]


def estimate_f0(
    wav: np.ndarray,
    sr: int,
    fmin: float = 60.0,
    fmax: float = 500.0,
    hop_s: float = 0.01,
    threshold: float = 0.15,
    silence_db: float = -35.0,
) -> np.ndarray:
    """Fundamental frequency per 10 ms frame (Hz), NaN where unvoiced: a YIN-style estimator.

    YIN (de Cheveigne & Kawahara, 2002): the difference function d(tau) of a frame with itself
    shifted by tau, normalised by its running mean (CMND); the first lag where the CMND dips below
    ``threshold`` (then descended to its local minimum) is the period. Frames with no such dip, or
    quieter than ``silence_db`` below the loudest frame, are unvoiced. Unlike a plain autocorrelation
    peak picker this has a voicing decision and rarely halves high voices.
    """
    tau_min = max(2, int(sr / fmax))
    tau_max = int(np.ceil(sr / fmin))
    window = tau_max  # integration window W
    hop = max(1, int(hop_s * sr))
    frames = frame_signal(np.asarray(wav, dtype=np.float64), window + tau_max + 1, hop)
    a = frames[:, :window]
    n_fft = int(2 ** np.ceil(np.log2(frames.shape[1] + window)))
    acf = np.fft.irfft(np.conj(np.fft.rfft(a, n_fft)) * np.fft.rfft(frames, n_fft), n_fft)[:, : tau_max + 1]
    cumulative = np.concatenate([np.zeros((len(frames), 1)), np.cumsum(frames**2, axis=1)], axis=1)
    taus = np.arange(tau_max + 1)
    energy_shifted = cumulative[:, taus + window] - cumulative[:, taus]
    diff = cumulative[:, [window]] + energy_shifted - 2 * acf
    diff[:, 0] = 0.0
    running = np.cumsum(diff[:, 1:], axis=1) / np.arange(1, tau_max + 1)[None, :]
    cmnd = np.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] / np.maximum(running, 1e-12)

    search = cmnd[:, tau_min : tau_max + 1]
    below = search < threshold
    has_dip = below.any(axis=1)
    idx = np.argmax(below, axis=1)
    rows = np.arange(len(search))
    for _ in range(search.shape[1]):  # descend to the local minimum after the first dip
        nxt = np.minimum(idx + 1, search.shape[1] - 1)
        step = search[rows, nxt] < search[rows, idx]
        if not step.any():
            break
        idx = np.where(step, nxt, idx)
    # parabolic interpolation around the minimum for sub-sample precision
    left = search[rows, np.maximum(idx - 1, 0)]
    mid = search[rows, idx]
    right = search[rows, np.minimum(idx + 1, search.shape[1] - 1)]
    denom = left - 2 * mid + right
    safe = np.abs(denom) > 1e-12
    shift = np.divide(0.5 * (left - right), denom, out=np.zeros_like(denom), where=safe)
    period = tau_min + idx + np.clip(shift, -1, 1)
    f0 = sr / period

    rms_db = 10 * np.log10(np.mean(a**2, axis=1) + 1e-12)
    loud = rms_db > rms_db.max() + silence_db
    f0 = np.where(has_dip & loud & (f0 >= fmin) & (f0 <= fmax), f0, np.nan)
    return f0.astype(np.float32)


def prosody_summary(wav: np.ndarray, sr: int, n_words: int) -> dict:
    """Duration, speaking rate, mean F0, F0 range and energy of one utterance."""
    start, end = speech_bounds(wav, sr)
    speech = wav[start:end]
    f0 = estimate_f0(speech, sr)
    voiced = f0[np.isfinite(f0)]
    energy = frame_energy_db(speech, sr)
    active = energy[energy > energy.max() - 35.0]
    speech_s = max(len(speech) / sr, 1e-3)
    return {
        "duration_s": len(wav) / sr,
        "speech_s": speech_s,
        "rate_words_per_s": n_words / speech_s,
        "f0_mean_hz": float(np.mean(voiced)) if voiced.size else float("nan"),
        "f0_range_semitones": float(12 * np.log2(np.percentile(voiced, 95) / np.percentile(voiced, 5)))
        if voiced.size > 5
        else float("nan"),
        "voiced_fraction": float(np.isfinite(f0).mean()),
        "energy_db": float(np.mean(active)) if active.size else float("nan"),
    }


def hifigan_log_mel(wav: np.ndarray, sr: int = 22050, n_fft: int = 1024, hop: int = 256, n_mels: int = 80,
                    fmin: float = 0.0, fmax: float = 8000.0):
    """Log-mel spectrogram (80, frames) with the packaged HiFi-GAN's training conventions.

    Magnitude (not power) STFT of a reflect-padded, uncentred signal with a Hann window, Slaney
    mel filters from 0 to 8 kHz, natural log clamped at 1e-5: the features the vocoder expects.
    """
    import torch
    import torchaudio.functional as AF

    if sr != 22050:
        raise AudioError(f"HiFi-GAN mels need 22050 Hz audio, got {sr} Hz: resample first")
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32))[None, None]
    pad = (n_fft - hop) // 2
    x = torch.nn.functional.pad(x, (pad, pad), mode="reflect")[0]
    spec = torch.stft(x, n_fft, hop_length=hop, win_length=n_fft, window=torch.hann_window(n_fft),
                      center=False, return_complex=True)
    magnitude = torch.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    filters = AF.melscale_fbanks(n_fft // 2 + 1, fmin, fmax, n_mels, sr, norm="slaney", mel_scale="slaney")
    mel = torch.matmul(filters.T, magnitude[0])
    return torch.log(torch.clamp(mel, min=1e-5))
