"""Speech encoders of the kit: Whisper's semantic frames, an emotion encoder, and the adapters.

Emotion Omni feeds its LLM two streams per 20 ms of speech: Whisper encoder frames (what was
said) and emotion2vec frames (how it was said), each downsampled to 10 Hz by a convolutional
adapter, concatenated and projected to the LLM's width. This module builds the three parts:

- ``whisper_encoder_frames``: Whisper tiny.en encoder frames (384-d, 50 Hz), cut to the audio.
- ``EmotionEncoder``: the kit's stand-in for emotion2vec (no pretrained one is available
  offline). A small convolutional network over log-mel and pitch features, trained here to
  recognise the 7 emotions; it gives one ``emotion_dim`` frame per 20 ms, aligned with Whisper's.
  A closed-form linear erasure removes what a linear reader could tell about the speaker.
- ``DownsampleAdapter`` and ``SpeechProjector``: 50 Hz -> 10 Hz, then to the LLM's width.

Frame arithmetic (16 kHz audio of n samples), shared by Whisper and the emotion encoder:
100 Hz input frames ``T100 = ceil(n / 160)``; 50 Hz frames ``T50 = ceil(T100 / 2) = ceil(n / 320)``;
10 Hz adapter frames ``T10 = ceil(T50 / 5)``.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .audio import estimate_f0, load_audio
from .corpus import EMOTIONS
from .train import CheckpointError, load_checkpoint, save_checkpoint

SAMPLE_RATE = 16000
HOP_100HZ = 160  # 10 ms at 16 kHz
SAMPLES_PER_50HZ_FRAME = 320  # 20 ms: one Whisper encoder frame
WHISPER_MAX_SECONDS = 30
ADAPTER_STRIDE = 5  # 50 Hz -> 10 Hz
EMOTION_NOTEBOOK = "notebooks/02_features.ipynb"
EMOTION_CHECKPOINT_KIND = "emotion_encoder"


# ---------------------------------------------------------------------------------------------
# Frame arithmetic
# ---------------------------------------------------------------------------------------------
def frames_100hz(n_samples: int) -> int:
    """Input frames of the emotion encoder for ``n_samples`` of 16 kHz audio: ceil(n / 160)."""
    return -(-int(n_samples) // HOP_100HZ)


def frames_50hz(n_samples: int) -> int:
    """Whisper (and emotion) frames for ``n_samples`` of 16 kHz audio: ceil(n / 320)."""
    return -(-int(n_samples) // SAMPLES_PER_50HZ_FRAME)


def stem_length(t100: int) -> int:
    """50 Hz frames made from ``t100`` input frames by the stride-2 stem: ceil(t100 / 2)."""
    return -(-int(t100) // 2)


def downsampled_length(t50: int) -> int:
    """10 Hz adapter frames for ``t50`` 50 Hz frames: ceil(t50 / 5).

    The input is right-padded with zeros to a multiple of 5, so 1 to 4 frames (20-80 ms of
    audio) still give one output frame; 0 frames give 0.
    """
    return -(-int(t50) // ADAPTER_STRIDE)


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_length) bool mask, True on valid frames."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


def pad_frames(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_i, D) arrays into a zero-padded (B, T_max, D) float tensor and a (B, T_max) mask."""
    lengths = torch.tensor([len(a) for a in arrays], dtype=torch.long)
    batch = torch.zeros(len(arrays), int(lengths.max()), arrays[0].shape[1], dtype=torch.float32)
    for i, a in enumerate(arrays):
        batch[i, : len(a)] = torch.as_tensor(np.asarray(a, dtype=np.float32))
    return batch, lengths_to_mask(lengths, batch.shape[1])


def _length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    # Neighbours in length share a batch, so little compute goes into padding.
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _check_wav(wav: np.ndarray, index: int) -> np.ndarray:
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"signal {index}: expected a non-empty 1-D 16 kHz signal, got shape {wav.shape}")
    return wav


# ---------------------------------------------------------------------------------------------
# Semantic features: Whisper encoder frames
# ---------------------------------------------------------------------------------------------
def whisper_window_seconds(max_samples: int, margin_s: float = 1.0) -> int:
    """Encoder window for a batch: its longest audio plus ``margin_s``, in whole seconds, at most 30."""
    return int(min(WHISPER_MAX_SECONDS, math.ceil(max_samples / SAMPLE_RATE + margin_s)))


def _whisper_encoder_module(encoder):
    # Accept the encoder itself or the whole WhisperForConditionalGeneration.
    if hasattr(encoder, "embed_positions"):
        return encoder
    if hasattr(encoder, "get_encoder"):
        return encoder.get_encoder()
    raise TypeError(f"expected a Whisper encoder (or Whisper model), got {type(encoder).__name__}")


def _run_whisper_encoder(encoder, mel: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder forward on a mel window of any length up to 30 s: (B, 80, 2T) -> (B, T, d).

    The same modules and order as transformers' ``WhisperEncoder.forward`` (which refuses any
    window but 3000 frames), with the positional table cut to the window's T positions.
    """
    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    for layer in encoder.layers:
        x = layer(x, None)
    return encoder.layer_norm(x)


def whisper_encoder_frames(
    encoder,
    processor,
    wavs16k: list[np.ndarray],
    batch_size: int = 16,
    progress: bool = False,
    full_window: bool = False,
    margin_s: float = 1.0,
) -> list[np.ndarray]:
    """Whisper encoder frames per utterance: (T_i, d) float32, T_i = ceil(n_samples / 320).

    Frames past the audio's end (the encoder's view of the zero padding) are cut off, so no
    padding leaks into the features. Audio longer than 30 s is cut to 30 s (1500 frames).

    Speed versus fidelity: Whisper was trained on 30 s windows only, and transformers' encoder
    accepts nothing else, so a 3 s sentence would pay for 30 s of attention and MLPs. Here the
    encoder runs on a window sized to each batch (longest audio + ``margin_s``, whole seconds,
    at most 30 s): several times faster on short utterances. The price: self-attention sees less
    trailing silence, so the kept frames are close to, but not identical with, the 30 s
    window's (cosine similarity well below 1 for a few frames, mostly near the end of the
    audio; see the measurement in notebooks/02_features.ipynb and tests/unit/test_encoders.py).
    ``full_window=True`` gives the standard 30 s computation for comparison.
    """
    encoder = _whisper_encoder_module(encoder)
    wavs = [_check_wav(w, i) for i, w in enumerate(wavs16k)]
    limit = WHISPER_MAX_SECONDS * SAMPLE_RATE
    if any(len(w) > limit for w in wavs):
        warnings.warn("signals longer than 30 s are cut to their first 30 s (Whisper's window)")
        wavs = [w[:limit] for w in wavs]
    out: list[np.ndarray | None] = [None] * len(wavs)
    from tqdm.auto import tqdm

    batches = _length_sorted_batches([len(w) for w in wavs], batch_size)
    with torch.inference_mode():
        for idx in tqdm(batches, desc="whisper encoder", unit="batch", disable=not progress):
            batch = [wavs[i] for i in idx]
            seconds = WHISPER_MAX_SECONDS if full_window else whisper_window_seconds(max(map(len, batch)), margin_s)
            mel = processor.feature_extractor(
                batch, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                padding="max_length", max_length=seconds * SAMPLE_RATE, truncation=True,
            ).input_features
            frames = _run_whisper_encoder(encoder, mel.to(encoder.conv1.weight.dtype)).float().numpy()
            for row, i in enumerate(idx):
                out[i] = frames[row, : frames_50hz(len(wavs[i]))].copy()
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Emotion encoder inputs: 100 Hz log-mel + pitch + voicing + energy
# ---------------------------------------------------------------------------------------------
N_FFT = 512  # a 25 ms (400-sample) Hann window, zero-padded to 512 for the FFT
WIN_LENGTH = 400
N_MELS = 80
F0_REFERENCE_HZ = 100.0
F0_FILL_HZ = 150.0  # log-F0 value for utterances with no voiced frame at all (mid of the kit's voices)
MEL_FLOOR = 1e-6  # about -60 dB: exact digital silence (espeak-ng pauses) stays a finite value
FEATURE_NAMES = [f"log_mel_{i}" for i in range(N_MELS)] + [
    "log_f0_semitones", "relative_f0_semitones", "voicing", "energy_db",
]
INPUT_DIM = len(FEATURE_NAMES)


@lru_cache(maxsize=1)
def _mel_filters() -> torch.Tensor:
    import torchaudio.functional as AF

    # Slaney-style filters from 0 to 8 kHz, as Whisper's front end uses.
    return AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE,
                              norm="slaney", mel_scale="slaney")


def _power_spectrum_100hz(wav: np.ndarray) -> torch.Tensor:
    """(T100, 257) power spectrum; frame t is centred on sample 160 t, like Whisper's mel frames."""
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    # Zero padding, not reflection: reflection fails on audio shorter than half a window.
    spec = torch.stft(x, N_FFT, hop_length=HOP_100HZ, win_length=WIN_LENGTH,
                      window=torch.hann_window(WIN_LENGTH), center=True, pad_mode="constant",
                      return_complex=True)
    return spec.abs().pow(2).T[: frames_100hz(len(wav))]


def _energy_db(power: torch.Tensor) -> torch.Tensor:
    # Parseval on the one-sided spectrum: the mean square of the Hann-weighted frame, in dB.
    # Taken from the same STFT as the mel bands, so it is aligned with them by construction.
    # Absolute level, not normalised per utterance: loudness is one of the emotion cues.
    weights = torch.full((power.shape[1],), 2.0)
    weights[0] = weights[-1] = 1.0
    frame_energy = (power * weights).sum(dim=1) / N_FFT
    window_energy = torch.hann_window(WIN_LENGTH).pow(2).sum()
    return 10.0 * torch.log10(frame_energy / window_energy + 1e-10)


def _centred_f0(wav: np.ndarray, t100: int) -> np.ndarray:
    """F0 (Hz, NaN unvoiced) per 10 ms frame, frame t centred on sample 160 t like the mel frames.

    ``audio.estimate_f0``'s frame t starts at sample 160 t and spans about 2 x the longest
    period (267 samples at 60 Hz), so padding that much silence in front centres it.
    """
    half_span = int(np.ceil(SAMPLE_RATE / 60.0))
    padded = np.pad(wav, (half_span, half_span + 1))
    f0 = estimate_f0(padded, SAMPLE_RATE)[:t100]
    if len(f0) < t100:
        f0 = np.concatenate([f0, np.full(t100 - len(f0), np.nan, dtype=np.float32)])
    return f0


def _interpolate_unvoiced(values: np.ndarray, voiced: np.ndarray, fill: float) -> np.ndarray:
    # Straight lines across unvoiced gaps (held flat before the first and after the last voiced
    # frame): the convolutions see a continuous contour instead of jumps to an arbitrary value.
    if not voiced.any():
        return np.full(len(values), fill, dtype=np.float32)
    positions = np.arange(len(values))
    return np.interp(positions, positions[voiced], values[voiced]).astype(np.float32)


def pitch_features(f0: np.ndarray) -> np.ndarray:
    """(T, 3): log-F0 in semitones re 100 Hz, log-F0 re the utterance median, voicing flag.

    - absolute pitch carries the emotion's pitch level (sad and disgusted speech is low, happy
      and surprised speech high), but it is also the voice's own pitch, i.e. speaker identity;
    - pitch relative to the utterance's median voiced pitch keeps the intonation contour and
      its range (wide for joy and surprise, flat for sadness and fear) without the speaker's level;
    - the voicing flag (1 voiced, 0 unvoiced or silent) marks where the two pitch tracks were
      interpolated, and its rhythm reflects speaking rate and pauses.
    """
    voiced = np.isfinite(f0) & (f0 > 0)
    semitones = np.where(voiced, 12.0 * np.log2(np.where(voiced, f0, 1.0) / F0_REFERENCE_HZ), 0.0)
    fill = 12.0 * np.log2(F0_FILL_HZ / F0_REFERENCE_HZ)
    absolute = _interpolate_unvoiced(semitones, voiced, fill)
    relative = absolute - (np.median(semitones[voiced]) if voiced.any() else fill)
    return np.stack([absolute, relative, voiced.astype(np.float32)], axis=1).astype(np.float32)


def emotion_input_features(wav16k: np.ndarray) -> np.ndarray:
    """Emotion encoder inputs at 100 Hz: (T100, 84) float32, T100 = ceil(n_samples / 160).

    Columns (``FEATURE_NAMES``):
    - 80 log-mel bands (natural log of power, floor 1e-6), 25 ms Hann window, 10 ms hop, 0-8 kHz:
      the spectral envelope, voice quality and effort, Whisper's view of the sound at twice
      its time resolution;
    - log-F0 in semitones re 100 Hz, then log-F0 relative to the utterance median (see
      ``pitch_features``), then the voicing flag; F0 from ``audio.estimate_f0`` (YIN), unvoiced
      frames filled by interpolation;
    - frame energy in dB (absolute level: loudness is an emotion cue).
    Frame t of every column is centred on sample 160 t (t = 0 at the first sample).
    """
    wav = _check_wav(wav16k, 0)
    power = _power_spectrum_100hz(wav)
    log_mel = torch.log(power @ _mel_filters() + MEL_FLOOR)
    energy = _energy_db(power)
    pitch = pitch_features(_centred_f0(wav, len(power)))
    return np.concatenate([log_mel.numpy(), pitch, energy.numpy()[:, None]], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Emotion encoder
# ---------------------------------------------------------------------------------------------
@dataclass
class EmotionEncoderConfig:
    """Shape of an ``EmotionEncoder``; saved in its checkpoint."""

    input_dim: int = INPUT_DIM
    emotion_dim: int = 256  # width of the emotion frames (emotion2vec base: 768)
    layers: int = 4  # residual convolution blocks after the stem
    kernel_size: int = 5  # depthwise kernel; block i is dilated by 2**i to widen the context
    num_classes: int = len(EMOTIONS)
    num_speakers: int = 0  # > 0 adds a speaker head for the gradient-reversal adversary
    erase_rank: int = 0  # > 0: linear speaker erasure of the frames (see fit_speaker_erasure)
    n_mels: int = N_MELS  # the first n_mels input columns are log-mel bands
    utterance_norm_mel: bool = True  # subtract each utterance's mean log-mel spectrum
    dropout: float = 0.1


class _ConvBlock(nn.Module):
    """Residual block: depthwise dilated conv (time context) -> LayerNorm -> pointwise MLP."""

    def __init__(self, width: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.depthwise = nn.Conv1d(width, width, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                                   dilation=dilation, groups=width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x (B, T, D)
        h = self.depthwise(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.mlp(self.norm(h))
        # Padded frames are kept at zero, so a padded batch gives the same valid frames as one item.
        return x * mask[..., None]


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -scale (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


class EmotionEncoder(nn.Module):
    """Frame-level emotion encoder: (B, T100, input_dim) at 100 Hz -> (B, T50, emotion_dim) at 50 Hz.

    Stem: Conv1d(k=3, stride 2, padding 1) + GELU, the same geometry as Whisper's second
    convolution, so output frame j is centred on input frame 2j (time 20 ms x j) exactly like
    Whisper's encoder frame j, and T50 = ceil(T100 / 2) = ceil(n_samples / 320). Then
    ``layers`` residual depthwise-convolution blocks with dilations 1, 2, 4, ... (about 1.2 s
    of context with 4 blocks and kernel 5) and a final LayerNorm give the emotion frames.
    Utterance head (for pretraining and the emotion filter): attentive statistics pooling
    (attention-weighted mean and standard deviation over valid frames) -> Linear to 7 classes.
    Input normalisation (per-utterance log-mel mean removal, then the training set's mean and
    standard deviation, stored as buffers) happens inside, so saved models need no side file.
    With ``erase_rank`` > 0 the frames end with a linear speaker erasure
    (``fit_speaker_erasure``), also stored as buffers.
    """

    def __init__(self, config: EmotionEncoderConfig | None = None, **overrides):
        super().__init__()
        config = config or EmotionEncoderConfig(**overrides)
        self.config = config
        d = config.emotion_dim
        self.register_buffer("feature_mean", torch.zeros(config.input_dim))
        self.register_buffer("feature_std", torch.ones(config.input_dim))
        self.stem = nn.Conv1d(config.input_dim, d, kernel_size=3, stride=2, padding=1)
        self.blocks = nn.ModuleList(
            _ConvBlock(d, config.kernel_size, 2**i, config.dropout) for i in range(config.layers)
        )
        self.out_norm = nn.LayerNorm(d)
        self.attention = nn.Linear(d, 1)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(2 * d, config.num_classes)
        self.speaker_head = (
            nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, config.num_speakers))
            if config.num_speakers > 0 else None
        )
        # Speaker erasure: frames -> frames - ((frames - center) @ basis) @ basis.T, fitted after
        # training; zero basis columns (the initial state) erase nothing.
        self.register_buffer("erase_center", torch.zeros(d))
        self.register_buffer("erase_basis", torch.zeros(d, config.erase_rank))

    # input normalisation ------------------------------------------------------------------
    def utterance_normalize(self, features: torch.Tensor, mask100: torch.Tensor) -> torch.Tensor:
        """Remove each utterance's mean log-mel spectrum over its valid frames (if configured).

        The long-term spectrum is mostly the voice (formants, vocal-tract length) and the
        channel; removing it leaves spectral change over time, which keeps emotion and drops
        much of the speaker. Pitch and energy columns are left alone.
        """
        if not self.config.utterance_norm_mel:
            return features
        n = self.config.n_mels
        weights = mask100[..., None].float()
        mean = (features[..., :n] * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
        return torch.cat([features[..., :n] - mean, features[..., n:]], dim=-1)

    def set_feature_stats(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Store the training set's per-column mean and std (after ``utterance_normalize``)."""
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(np.maximum(std, 1e-3), dtype=torch.float32))

    # forward ------------------------------------------------------------------------------
    def encode(self, features: torch.Tensor, lengths100: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T100, C) features and (B,) valid lengths -> (B, T50, D) frames and (B, T50) mask."""
        frames, mask = self.encode_before_erasure(features, lengths100)
        return self.erase_speaker(frames, mask), mask

    def encode_before_erasure(self, features: torch.Tensor, lengths100: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames before the speaker erasure (what ``fit_speaker_erasure`` is fitted on)."""
        mask100 = lengths_to_mask(lengths100, features.shape[1])
        x = (self.utterance_normalize(features, mask100) - self.feature_mean) / self.feature_std
        x = x * mask100[..., None]
        x = F.gelu(self.stem(x.transpose(1, 2))).transpose(1, 2)
        mask = lengths_to_mask(-(-lengths100 // 2), x.shape[1])
        x = x * mask[..., None]
        for block in self.blocks:
            x = block(x, mask)
        return self.out_norm(x) * mask[..., None], mask

    def erase_speaker(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Remove the fitted speaker subspace from every frame (identity when erase_rank = 0)."""
        if self.config.erase_rank == 0:
            return frames
        coordinates = (frames - self.erase_center) @ self.erase_basis
        return (frames - coordinates @ self.erase_basis.T) * mask[..., None]

    def fit_speaker_erasure(self, pooled: np.ndarray, speakers: list[str]) -> int:
        """Fit the linear speaker erasure on mean-pooled frames (before erasure) of many utterances.

        Closed-form linear concept erasure (Ravfogel et al. 2020; Belrose et al. 2023, LEACE):
        no linear classifier can predict a label from features that have zero covariance with
        it. That covariance, Cov(x, one-hot speaker), has columns p_s (mu_s - mu): the speaker
        means' offsets. Projecting out the subspace they span (rank <= speakers - 1) makes every
        speaker's mean-pooled frames share one mean, on the utterances fitted, so a linear probe
        on them falls to chance. Because mean pooling is linear, the projection is applied to
        each frame. The guarantee is linear only: a nonlinear probe can still find some speaker
        information. Returns the rank erased.
        """
        x = np.asarray(pooled, dtype=np.float64)
        labels = np.asarray(speakers)
        names = np.unique(labels)
        means = np.stack([x[labels == s].mean(0) for s in names])
        return self.set_speaker_erasure(means, np.array([(labels == s).mean() for s in names]))

    def set_speaker_erasure(self, speaker_means: np.ndarray, shares: np.ndarray) -> int:
        """Erase the span of ``shares[s] * (speaker_means[s] - center)``, center = the weighted mean."""
        shares = np.asarray(shares, dtype=np.float64) / np.sum(shares)
        center = shares @ speaker_means
        offsets = (shares[:, None] * (speaker_means - center)).T  # (D, speakers): Cov(x, one-hot)
        basis, singular, _ = np.linalg.svd(offsets, full_matrices=False)
        rank = int(min(self.config.erase_rank, (singular > 1e-8 * max(singular.max(), 1e-30)).sum()))
        padded = np.zeros((len(center), self.config.erase_rank))
        padded[:, :rank] = basis[:, :rank]
        self.erase_center.copy_(torch.as_tensor(center, dtype=torch.float32))
        self.erase_basis.copy_(torch.as_tensor(padded, dtype=torch.float32))
        return rank

    def pool(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attentive statistics pooling: (B, T50, D) -> (B, 2D) weighted mean and std."""
        scores = self.attention(frames).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)[..., None]
        mean = (weights * frames).sum(1)
        var = (weights * (frames - mean[:, None]) ** 2).sum(1)
        return torch.cat([mean, var.clamp(min=1e-6).sqrt()], dim=-1)

    def utterance_logits(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(frames, mask)))

    def speaker_logits(self, frames: torch.Tensor, mask: torch.Tensor, reversal: float) -> torch.Tensor:
        """Speaker logits from the plain mean of the frames, behind a gradient-reversal layer.

        The adversary sees what the probes and the adapters see (the frames themselves, mean-
        pooled), and reversing its gradient pushes the encoder to make speakers unrecoverable.
        """
        if self.speaker_head is None:
            raise RuntimeError("this EmotionEncoder has no speaker head (config.num_speakers = 0)")
        mean = (frames * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.speaker_head(_GradientReversal.apply(mean, reversal))

    def forward(self, features: torch.Tensor, lengths100: torch.Tensor):
        """(frames, mask, emotion logits)."""
        frames, mask = self.encode(features, lengths100)
        return frames, mask, self.utterance_logits(frames, mask)


# ---------------------------------------------------------------------------------------------
# Data: utterances of a manifest and their cached input features
# ---------------------------------------------------------------------------------------------
# Input features per wav file, so training, evaluation and probes compute them once per process.
# float16 halves the memory (about 0.3 GB for the cpu preset); the features need no more precision.
_INPUT_CACHE: dict[tuple[str, int, int], np.ndarray] = {}


def clear_feature_cache() -> None:
    _INPUT_CACHE.clear()


def manifest_utterances(rows: list[dict], splits: tuple[str, ...], roles: tuple[str, ...] = ("query", "response")) -> list[dict]:
    """Kept utterances of the given splits: one dict per wav with emotion, speaker, split, role."""
    items = []
    for row in rows:
        if not row.get("kept") or row["split"] not in splits:
            continue
        for role in roles:
            items.append({"pair_id": row["pair_id"], "role": role, "split": row["split"],
                          "wav": row[f"{role}_wav"], "emotion": row[f"{role}_emotion"],
                          "speaker": row[f"{role}_speaker"]})
    return items


@lru_cache(maxsize=4)
def _resampler(sr_in: int):
    import torchaudio

    return torchaudio.transforms.Resample(sr_in, SAMPLE_RATE)


def load_audio_16k(path: str | Path) -> np.ndarray:
    """``audio.load_audio(path, target_sr=16000)``, with the resampling kernel built once per rate.

    Same windowed-sinc filter (torchaudio), so the same samples up to float rounding (about
    1e-5), but 5x faster: the functional form rebuilds its 22.05 -> 16 kHz kernel on every call.
    """
    wav, sr = load_audio(path)
    if sr == SAMPLE_RATE:
        return wav
    with torch.inference_mode():
        return _resampler(int(sr))(torch.from_numpy(wav)).numpy()


def _input_features_of_file(path: str) -> np.ndarray:
    """``emotion_input_features`` of one wav file as float16 (runs in worker processes too)."""
    torch.set_num_threads(1)  # one process per core: no thread oversubscription
    return emotion_input_features(load_audio_16k(path)).astype(np.float16)


def cached_input_features(paths: list[Path], progress: bool = False, desc: str = "emotion features",
                          workers: int = 1) -> list[np.ndarray]:
    """``emotion_input_features`` of each wav file (loaded at 16 kHz), memoised per file version.

    ``workers`` > 1 computes the files not yet cached in that many processes (YIN pitch
    tracking is single-threaded NumPy and most of the cost: about 10 ms per second of audio
    on one core). Same numbers either way. The workers are started with "spawn", so a script
    calling this needs Python's usual ``if __name__ == "__main__":`` guard (notebooks do not).
    """
    from tqdm.auto import tqdm

    keys = []
    for path in paths:
        stat = Path(path).stat()
        keys.append((str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size))
    todo = sorted({k for k in keys if k not in _INPUT_CACHE})
    bar = tqdm(total=len(todo), desc=desc, unit="wav", disable=not progress or not todo)
    if workers > 1 and len(todo) >= 4 * workers:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # "spawn": a forked child of a process whose OpenMP threads already ran can hang.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for key, features in zip(todo, pool.map(_input_features_of_file, [k[0] for k in todo], chunksize=16)):
                _INPUT_CACHE[key] = features
                bar.update()
    else:
        for key in todo:
            _INPUT_CACHE[key] = emotion_input_features(load_audio_16k(key[0])).astype(np.float16)
            bar.update()
    bar.close()
    return [_INPUT_CACHE[k] for k in keys]


def _features_of_items(items: list[dict], run_root: str | Path, progress: bool) -> list[np.ndarray]:
    return cached_input_features([Path(run_root) / it["wav"] for it in items], progress)


def _pad_inputs(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (B, T100, C) input batch and its (B,) lengths, the form ``EmotionEncoder`` takes."""
    batch, mask = pad_frames(arrays)
    return batch, mask.sum(1)


def _encode_features(model: EmotionEncoder, features: list[np.ndarray], batch_size: int = 16):
    """Frames (list of (T50_i, D)) and logits (N, 7) for a list of input feature arrays."""
    frames: list[np.ndarray | None] = [None] * len(features)
    logits = np.zeros((len(features), model.config.num_classes), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for idx in _length_sorted_batches([len(f) for f in features], batch_size):
            batch, lengths = _pad_inputs([features[i] for i in idx])
            out, mask, batch_logits = model(batch, lengths)
            for row, i in enumerate(idx):
                frames[i] = out[row, : int(mask[row].sum())].numpy().copy()
                logits[i] = batch_logits[row].numpy()
    return frames, logits


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
DEFAULT_TRAIN_CONFIG = {
    "seed": 0,
    "emotion_dim": 256,
    "layers": 4,
    "kernel_size": 5,
    "dropout": 0.1,
    "utterance_norm_mel": True,
    "epochs": 8,
    "lr": 2e-3,
    "weight_decay": 0.01,
    "batch_size": 32,
    "crop_seconds": 4.0,  # training crops: long responses cost no more than a sentence
    "class_balance": True,
    "label_smoothing": 0.05,
    "speaker_erasure": True,  # linear speaker erasure of the frames (EmotionEncoder.fit_speaker_erasure)
    "head_epochs": 3,  # utterance-head epochs on the erased frames (encoder frozen)
    "speaker_adversary": 0.0,  # gradient-reversal weight of the speaker adversary; 0 = off
    "speaker_augment_semitones": 0.0,  # random voice change of training crops (see _speaker_augment); 0 = off
}


def _resolve_train_config(cfg: dict | None) -> dict:
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(DEFAULT_TRAIN_CONFIG))
    if unknown:
        raise ValueError(f"unknown emotion-encoder training keys {unknown}; valid: {sorted(DEFAULT_TRAIN_CONFIG)}")
    return {**DEFAULT_TRAIN_CONFIG, **cfg}


def _feature_stats(model: EmotionEncoder, features: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    # Mean and std of every column over all valid training frames, after per-utterance
    # normalisation, so the network sees inputs of unit scale (log-mel, semitones and dB differ a lot).
    total = np.zeros(model.config.input_dim)
    total_sq = np.zeros(model.config.input_dim)
    count = 0
    for f in features:
        x = torch.from_numpy(np.asarray(f, dtype=np.float32))[None]
        x = model.utterance_normalize(x, torch.ones(1, len(f), dtype=torch.bool))[0].double().numpy()
        total += x.sum(0)
        total_sq += (x**2).sum(0)
        count += len(x)
    mean = total / count
    return mean, np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))


def _random_crop(feature: np.ndarray, max_frames: int, rng: np.random.Generator) -> np.ndarray:
    if len(feature) <= max_frames:
        return feature
    start = int(rng.integers(0, len(feature) - max_frames + 1))
    return feature[start : start + max_frames]


def _speaker_augment(feature: np.ndarray, rng: np.random.Generator, semitones: float) -> np.ndarray:
    """A training crop as if said by another voice: absolute pitch and formants moved together.

    The absolute log-F0 column moves by a random offset in [-semitones, +semitones], and the
    log-mel bands are resampled along the mel axis by a factor exp(offset / 24) (a vocal-tract-
    length change, approximately: formant frequencies scale with half the pitch change in log
    terms, mel is roughly logarithmic above 1 kHz). Relative pitch, voicing and energy stay:
    they carry the emotion, not the voice.
    """
    x = np.asarray(feature, dtype=np.float32).copy()
    offset = float(rng.uniform(-semitones, semitones))
    x[:, FEATURE_NAMES.index("log_f0_semitones")] += offset
    source = np.clip(np.arange(N_MELS) / np.exp(offset / 24.0), 0, N_MELS - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, N_MELS - 1)
    frac = (source - low).astype(np.float32)
    x[:, :N_MELS] = x[:, low] * (1 - frac) + x[:, high] * frac
    return x


def _class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    # Inverse frequency, mean 1 over present classes: anger and fear occur only in queries,
    # neutral and sadness dominate the responses.
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def _shuffled_length_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    # Sort by length with random tie-breaking, cut into batches, shuffle the batch order:
    # little padding, yet a different batch composition and order every epoch.
    jitter = rng.random(len(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], jitter[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float | None:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else None


def _pooled_before_erasure(model: EmotionEncoder, features: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """(N, D) mean-pooled frames before the speaker erasure (eval mode, whole utterances)."""
    pooled = np.zeros((len(features), model.config.emotion_dim))
    model.eval()
    with torch.inference_mode():
        for idx in _length_sorted_batches([len(f) for f in features], batch_size):
            frames, mask = model.encode_before_erasure(*_pad_inputs([features[i] for i in idx]))
            pooled[idx] = ((frames.sum(1) / mask.sum(1, keepdim=True)).double().numpy())
    return pooled


def _adversary_reversal(weight: float, progress_fraction: float) -> float:
    # Ganin & Lempitsky's ramp 2 / (1 + exp(-10 p)) - 1: the adversary's reversed gradient
    # starts at zero, so the encoder first learns emotion, then is pushed to hide the speaker.
    return weight * (2.0 / (1.0 + math.exp(-10.0 * progress_fraction)) - 1.0)


def _train_one_epoch(model, crops, labels, speaker_ids, optimizer, schedule, criterion, cfg, rng,
                     step, total_steps, bar_desc, progress):
    """One pass over the crops; returns mean loss, accuracy, speaker loss and the step count."""
    from tqdm.auto import tqdm

    model.train()
    batches = _shuffled_length_batches([len(c) for c in crops], cfg["batch_size"], rng)
    losses, speaker_losses, correct = [], [], 0
    for idx in tqdm(batches, desc=bar_desc, unit="batch", disable=not progress, leave=False):
        frames, mask, logits = model(*_pad_inputs([crops[i] for i in idx]))
        loss = criterion(logits, labels[idx])
        if cfg["speaker_adversary"] > 0:
            reversal = _adversary_reversal(cfg["speaker_adversary"], step / total_steps)
            speaker_loss = F.cross_entropy(model.speaker_logits(frames, mask, reversal), speaker_ids[idx])
            speaker_losses.append(speaker_loss.item())
            loss = loss + speaker_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        schedule.step()
        step += 1
        losses.append(loss.item())
        correct += int((logits.argmax(1) == labels[idx]).sum())
    return {"loss": float(np.mean(losses)), "accuracy": correct / len(crops),
            "speaker_loss": float(np.mean(speaker_losses)) if speaker_losses else None, "step": step}


def _refit_head(model, features, labels, val_features, val_labels, criterion, cfg, rng, progress) -> list:
    """Retrain the utterance head (attention + classifier) on erased frames, encoder frozen.

    The head learned to read the speaker directions too (knowing the voice tells how high
    "high pitch" is); after the erasure it must learn to do without. Only the head's weights
    change, so the frames, and the erasure's guarantee, stay as fitted. Returns the val
    accuracy per head epoch; the best head is kept.
    """
    from tqdm.auto import tqdm

    head = list(model.attention.parameters()) + list(model.classifier.parameters())
    optimizer = torch.optim.AdamW(head, lr=cfg["lr"] / 2, weight_decay=cfg["weight_decay"])
    crop = max(2, int(cfg["crop_seconds"] * 100))
    accuracies, best = [], (_validate(model, val_features, val_labels)[1] or 0.0, _head_state(model))
    for epoch in range(cfg["head_epochs"]):
        crops = [_random_crop(f, crop, rng) for f in features]
        batches = _shuffled_length_batches([len(c) for c in crops], cfg["batch_size"], rng)
        model.eval()  # no dropout in the frozen encoder; the head trains without it too
        for idx in tqdm(batches, desc=f"head {epoch + 1}/{cfg['head_epochs']}", unit="batch", disable=not progress, leave=False):
            with torch.no_grad():
                frames, mask = model.encode(*_pad_inputs([crops[i] for i in idx]))
            loss = criterion(model.utterance_logits(frames, mask), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        accuracy = _validate(model, val_features, val_labels)[1]
        accuracies.append(accuracy)
        if accuracy is None or accuracy >= best[0]:
            best = (accuracy or 0.0, _head_state(model))
    model.load_state_dict(best[1], strict=False)
    return accuracies


def _head_state(model: EmotionEncoder) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(("attention.", "classifier."))}


def _validate(model, features, labels) -> tuple[float | None, float | None]:
    if not features:  # None, not NaN, without a val split: metrics.json refuses NaN
        return None, None
    _, logits = _encode_features(model, features)
    return float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))), _accuracy(logits, labels)


def train_emotion_encoder(rows: list[dict], run_root: str | Path, cfg: dict | None = None, progress: bool = True):
    """Train an ``EmotionEncoder`` to classify the 7 emotions; returns ``(model, history)``.

    Data: kept utterances (queries and responses, with their own emotion labels) of split
    ``train``; validation on split ``val`` (the same speakers). The held-out test speakers are
    never seen. Training uses random crops of ``crop_seconds``, length-bucketed batches,
    AdamW with a one-cycle learning rate and class-balanced cross-entropy with label smoothing.
    The model of the epoch with the best validation accuracy is returned. Everything is seeded
    from ``cfg["seed"]``.

    Speaker information: with ``speaker_erasure`` (default), after training a linear speaker
    erasure (``EmotionEncoder.fit_speaker_erasure``) is fitted on the whole training
    utterances and becomes the frames' last step; the utterance head is then retrained on the
    erased frames for ``head_epochs`` with the encoder frozen. (Erasing during training, from
    running speaker means, did worse on held-out speakers: 0.84 vs 0.91 before erasure.) ``speaker_adversary`` > 0 adds a
    gradient-reversal speaker adversary instead or as well (weaker in the kit's tests).

    ``history``: per-epoch lists ``train_loss``, ``train_accuracy``, ``val_loss``,
    ``val_accuracy`` (and ``speaker_loss`` with the adversary), plus ``best_epoch``,
    ``final_val_accuracy`` (after the final erasure fit), ``seconds`` (total, including
    feature extraction), utterance counts and ``config``.
    """
    cfg = _resolve_train_config(cfg)
    started = time.perf_counter()
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    train_items = manifest_utterances(rows, ("train",))
    val_items = manifest_utterances(rows, ("val",))
    if not train_items:
        raise ValueError("no kept utterances with split 'train' in the manifest rows")
    train_features = _features_of_items(train_items, run_root, progress)
    val_features = _features_of_items(val_items, run_root, progress)
    labels = torch.tensor([EMOTIONS.index(it["emotion"]) for it in train_items])
    val_labels = np.array([EMOTIONS.index(it["emotion"]) for it in val_items], dtype=np.int64)
    speakers = sorted({it["speaker"] for it in train_items})
    train_speakers = [it["speaker"] for it in train_items]
    speaker_ids = torch.tensor([speakers.index(s) for s in train_speakers])

    model = EmotionEncoder(EmotionEncoderConfig(
        emotion_dim=cfg["emotion_dim"], layers=cfg["layers"], kernel_size=cfg["kernel_size"],
        dropout=cfg["dropout"], utterance_norm_mel=cfg["utterance_norm_mel"],
        num_speakers=len(speakers) if cfg["speaker_adversary"] > 0 else 0,
        erase_rank=len(speakers) - 1 if cfg["speaker_erasure"] else 0,
    ))
    model.set_feature_stats(*_feature_stats(model, train_features))
    weights = _class_weights(labels.numpy(), len(EMOTIONS)) if cfg["class_balance"] else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg["label_smoothing"])
    crop = max(2, int(cfg["crop_seconds"] * 100))
    total_steps = cfg["epochs"] * math.ceil(len(train_items) / cfg["batch_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=total_steps, pct_start=0.15)

    history: dict = {"train_loss": [], "train_accuracy": [], "val_loss": [], "val_accuracy": [], "speaker_loss": []}
    best_state, best_key, step = None, None, 0
    for epoch in range(cfg["epochs"]):
        crops = [_random_crop(f, crop, rng) for f in train_features]
        if cfg["speaker_augment_semitones"] > 0:
            crops = [_speaker_augment(c, rng, cfg["speaker_augment_semitones"]) for c in crops]
        result = _train_one_epoch(model, crops, labels, speaker_ids, optimizer, schedule, criterion,
                                  cfg, rng, step, total_steps, f"epoch {epoch + 1}/{cfg['epochs']}", progress)
        step = result["step"]
        val_loss, val_accuracy = _validate(model, val_features, val_labels)
        for key, value in [("train_loss", result["loss"]), ("train_accuracy", result["accuracy"]),
                           ("val_loss", val_loss), ("val_accuracy", val_accuracy), ("speaker_loss", result["speaker_loss"])]:
            history[key].append(value)
        if progress:
            print(f"epoch {epoch + 1}: train loss {result['loss']:.3f} acc {result['accuracy']:.3f}"
                  + (f" | val loss {val_loss:.3f} acc {val_accuracy:.3f}" if val_features else ""))
        # Best validation accuracy, ties broken by lower loss; without a val split, the last epoch.
        key = (val_accuracy, -val_loss) if val_features else (epoch, 0.0)
        if best_key is None or key > best_key:
            best_key, history["best_epoch"] = key, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    if cfg["speaker_erasure"]:
        history["erased_rank"] = model.fit_speaker_erasure(_pooled_before_erasure(model, train_features), train_speakers)
        history["erased_val_accuracy"] = _validate(model, val_features, val_labels)[1]  # before the head refit
        history["head_val_accuracy"] = _refit_head(model, train_features, labels, val_features, val_labels,
                                                   criterion, cfg, rng, progress)
    history["final_val_accuracy"] = _validate(model, val_features, val_labels)[1]
    history["seconds"] = time.perf_counter() - started
    history["config"] = cfg
    history["train_utterances"], history["val_utterances"] = len(train_items), len(val_items)
    return model.eval(), history


# ---------------------------------------------------------------------------------------------
# Evaluation and probes
# ---------------------------------------------------------------------------------------------
def _confusion(true: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def _recall_per_class(matrix: np.ndarray) -> dict:
    totals = matrix.sum(1)
    return {e: (float(matrix[i, i] / totals[i]) if totals[i] else None) for i, e in enumerate(EMOTIONS)}


def evaluate_emotion_encoder(model: EmotionEncoder, rows: list[dict], run_root: str | Path, split: str = "test") -> dict:
    """7-class accuracy on split ``test`` (held-out speakers): queries, and all utterances.

    Returns accuracies, confusion matrices (rows = true, columns = predicted, in ``EMOTIONS``
    order) and per-class recall, for queries (all 7 emotions) and for all utterances
    (responses use 5 of them).
    """
    items = manifest_utterances(rows, (split,))
    if not items:
        raise ValueError(f"no kept utterances with split {split!r} in the manifest rows")
    _, logits = _encode_features(model, _features_of_items(items, run_root, progress=False))
    true = np.array([EMOTIONS.index(it["emotion"]) for it in items])
    predicted = logits.argmax(1)
    is_query = np.array([it["role"] == "query" for it in items])
    k = len(EMOTIONS)
    query_matrix = _confusion(true[is_query], predicted[is_query], k)
    all_matrix = _confusion(true, predicted, k)
    return {
        "split": split,
        "labels": list(EMOTIONS),
        "query_accuracy": _accuracy(logits[is_query], true[is_query]),
        "all_accuracy": _accuracy(logits, true),
        "n_queries": int(is_query.sum()),
        "n_utterances": len(items),
        "query_confusion": query_matrix.tolist(),
        "all_confusion": all_matrix.tolist(),
        "query_recall": _recall_per_class(query_matrix),
        "all_recall": _recall_per_class(all_matrix),
        "speakers": sorted({it["speaker"] for it in items}),
    }


def _probe_split(emotions: list[str], speakers: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One 70/30 split for both probes, stratified by (speaker, emotion) where every cell allows it."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(emotions))
    cells = [f"{s}/{e}" for s, e in zip(speakers, emotions)]
    for strata in (cells, emotions, None):
        try:
            return train_test_split(index, test_size=0.3, random_state=seed, stratify=strata)
        except ValueError:  # a stratum with a single member
            continue
    raise AssertionError("unreachable")


def _probe_accuracy(x: np.ndarray, labels: list[str], train_idx: np.ndarray, test_idx: np.ndarray,
                    nonlinear: bool = False, seed: int = 0) -> float:
    """Accuracy on ``test_idx`` of a standardised probe fitted on ``train_idx``.

    Linear: multinomial logistic regression (C = 1). Nonlinear: one hidden layer of 256 ReLU
    units (Adam, L2 1e-3, early stopping on 10 % of the fitting set, at most 200 epochs).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    if nonlinear:
        classifier = MLPClassifier((256,), alpha=1e-3, max_iter=200, early_stopping=True,
                                   n_iter_no_change=10, random_state=seed)
    else:
        classifier = LogisticRegression(max_iter=3000, C=1.0)
    probe = make_pipeline(StandardScaler(), classifier)
    with warnings.catch_warnings():  # a probe that stops at max_iter is still a valid probe
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        probe.fit(x[train_idx], y[train_idx])
    return float(probe.score(x[test_idx], y[test_idx]))


def _majority_rate(labels: list[str], test_idx: np.ndarray) -> float:
    values, counts = np.unique(np.asarray(labels)[test_idx], return_counts=True)
    return float(counts.max() / counts.sum())


def mean_pooled_frames(model: EmotionEncoder, features: list[np.ndarray], batch_size: int = 16,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) mean-pooled emotion frames per utterance, before and after the speaker erasure.

    The erasure is affine and applied to every frame, so the mean of the erased frames is the
    erasure of the mean: one encoder pass gives both.
    """
    before = _pooled_before_erasure(model, features, batch_size)
    with torch.inference_mode():
        pooled = torch.as_tensor(before, dtype=torch.float32)[:, None, :]
        after = model.erase_speaker(pooled, torch.ones(len(before), 1, dtype=torch.bool))[:, 0]
    return before, after.double().numpy()


def probe_emotion_vs_speaker(model: EmotionEncoder, rows: list[dict], run_root: str | Path, seed: int = 0,
                             nonlinear: bool = True) -> dict:
    """Probes on frozen, mean-pooled emotion frames: how much emotion vs speaker they hold.

    Protocol ("train->val", identical for every probe): each probe is fitted on the kept
    utterances (queries and responses) of split ``train`` and scored on those of split
    ``val``: the same speakers (a speaker probe cannot name a voice it never saw), but
    utterances that neither the encoder's weights nor the speaker erasure were fitted on (val
    only picked the best epoch and head). Scoring on the erasure's own fitting utterances would
    be circular: there every speaker's mean is equal by construction. Without a val split
    the fallback ("stratified 70/30 of train") splits the train utterances, stratified by
    (speaker, emotion), and is optimistic for the same reason; ``protocol`` says which was used.

    Probes: a standardised logistic regression (``*_probe_accuracy``) and a one-hidden-layer
    MLP (``*_mlp_probe_accuracy``, with ``nonlinear``), for emotion and for speaker, on the
    frames as the adapters see them (after the erasure) and on the raw frames
    (``*_before_erasure``). The erasure is linear: it removes what a linear reader can find,
    and the MLP shows what a nonlinear reader still finds. Chance: the majority class's share
    of the scored utterances, and 1 / number of classes.
    """
    train_items = manifest_utterances(rows, ("train",))
    val_items = manifest_utterances(rows, ("val",))
    if not train_items:
        raise ValueError("no kept utterances with split 'train' in the manifest rows")
    items = train_items + val_items
    before, after = mean_pooled_frames(model, _features_of_items(items, run_root, progress=False))
    emotions = [it["emotion"] for it in items]
    speakers = [it["speaker"] for it in items]
    if val_items:
        protocol = "train->val"
        train_idx, test_idx = np.arange(len(train_items)), np.arange(len(train_items), len(items))
    else:
        protocol = "stratified 70/30 of train"
        train_idx, test_idx = _probe_split(emotions, speakers, seed)
    report = {
        "protocol": protocol,
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "erased_rank": int((model.erase_basis.abs().sum(0) > 0).sum()) if model.config.erase_rank else 0,
    }
    kinds = [("", False)] + ([("mlp_", True)] if nonlinear else [])
    for stage, x in (("", after), ("_before_erasure", before)):
        for kind, is_mlp in kinds:
            for target, labels in (("emotion", emotions), ("speaker", speakers)):
                report[f"{target}_{kind}probe_accuracy{stage}"] = _probe_accuracy(
                    x, labels, train_idx, test_idx, nonlinear=is_mlp, seed=seed)
    report.update(
        emotion_chance_majority=_majority_rate(emotions, test_idx),
        speaker_chance_majority=_majority_rate(speakers, test_idx),
        emotion_chance_uniform=1.0 / len(set(emotions)),
        speaker_chance_uniform=1.0 / len(set(speakers)),
    )
    return report


# ---------------------------------------------------------------------------------------------
# Inference helpers
# ---------------------------------------------------------------------------------------------
def emotion_frames(model: EmotionEncoder, wavs16k: list[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
    """Emotion frames per signal: (T50_i, emotion_dim) float32, T50_i = ceil(n_samples / 320)."""
    features = [emotion_input_features(_check_wav(w, i)) for i, w in enumerate(wavs16k)]
    frames, _ = _encode_features(model, features, batch_size)
    return frames  # type: ignore[return-value]


def predict_emotions(model: EmotionEncoder, wavs16k: list[np.ndarray], batch_size: int = 16) -> tuple[list[str], list[float]]:
    """Predicted emotion per signal and its softmax probability (the emotion-recognizer filter)."""
    features = [emotion_input_features(_check_wav(w, i)) for i, w in enumerate(wavs16k)]
    _, logits = _encode_features(model, features, batch_size)
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    best = probabilities.argmax(1)
    return [EMOTIONS[i] for i in best], [float(probabilities[r, i]) for r, i in enumerate(best)]


def encode_wav_files(model: EmotionEncoder, paths: list[str | Path], batch_size: int = 16, progress: bool = False,
                     ) -> tuple[list[np.ndarray], list[str], list[float]]:
    """Emotion frames, recognised emotion and its probability for each wav file, in one pass.

    Input features come from ``cached_input_features``: files already seen by training,
    evaluation or the probes in this process are not featurised again (computing log-mel and
    YIN pitch is most of the cost).
    """
    features = cached_input_features([Path(p) for p in paths], progress, desc="emotion features")
    frames, logits = _encode_features(model, features, batch_size)
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    best = probabilities.argmax(1)
    return frames, [EMOTIONS[i] for i in best], [float(probabilities[r, i]) for r, i in enumerate(best)]  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def save_emotion_encoder(path: str | Path, model: EmotionEncoder, history: dict | None = None) -> Path:
    """Save config + state dict (+ optional training history) atomically."""
    payload = {"kind": EMOTION_CHECKPOINT_KIND, "config": asdict(model.config), "state_dict": model.state_dict()}
    if history is not None:
        payload["history"] = history
    return save_checkpoint(path, payload)


def load_emotion_encoder(path: str | Path, expected_dim: int | None = None) -> EmotionEncoder:
    """Load an ``EmotionEncoder`` saved by ``save_emotion_encoder`` (eval mode, CPU).

    ``expected_dim`` is the preset's emotion width: a checkpoint of another width raises a
    ``CheckpointError`` naming both. A missing file raises ``MissingInputError`` and a corrupt
    one ``CheckpointError``, both naming notebooks/02_features.ipynb, which makes it.
    """
    payload = load_checkpoint(path, EMOTION_NOTEBOOK)
    if payload.get("kind") != EMOTION_CHECKPOINT_KIND or "config" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"{path} is not an emotion-encoder checkpoint; run {EMOTION_NOTEBOOK} to make one.")
    known = {f.name for f in fields(EmotionEncoderConfig)}
    config = EmotionEncoderConfig(**{k: v for k, v in payload["config"].items() if k in known})
    if expected_dim is not None and config.emotion_dim != expected_dim:
        raise CheckpointError(
            f"{path} holds an emotion encoder of width {config.emotion_dim}, but the preset expects width "
            f"{expected_dim}. Run {EMOTION_NOTEBOOK} with this preset to train a matching encoder."
        )
    model = EmotionEncoder(config)
    state = dict(payload["state_dict"])
    if config.erase_rank == 0:  # checkpoints from before the speaker erasure existed: nothing to erase
        state.setdefault("erase_center", model.erase_center)
        state.setdefault("erase_basis", model.erase_basis)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match their config ({err}); run {EMOTION_NOTEBOOK} again.") from err
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Adapters: 50 Hz -> 10 Hz, then the LLM's width
# ---------------------------------------------------------------------------------------------
def downsample_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T50) bool -> (B, ceil(T50 / 5)) bool: an output frame is valid if any of its 5 inputs is."""
    pad = downsampled_length(mask.shape[1]) * ADAPTER_STRIDE - mask.shape[1]
    padded = F.pad(mask.float(), (0, pad))
    return padded.view(mask.shape[0], -1, ADAPTER_STRIDE).amax(-1) > 0


class DownsampleAdapter(nn.Module):
    """(B, T50, d_in) at 50 Hz -> (B, ceil(T50 / 5), d_out) at 10 Hz.

    Conv1d(d_in -> d_out, kernel 3, stride 1, padding 1) + GELU mixes each frame with its
    neighbours; Conv1d(d_out -> d_out, kernel 5, stride 5) then merges each 100 ms block of 5
    frames into one (no overlap: every input frame feeds exactly one output frame). The input
    is right-padded with zeros to a multiple of 5, and padded frames are zeroed before the
    convolutions, so padding never changes valid outputs. Emotion Omni's adapters also end at
    10 Hz (the "5x downsampling" of both streams).
    """

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.mix = nn.Conv1d(d_in, d_out, kernel_size=3, stride=1, padding=1)
        self.merge = nn.Conv1d(d_out, d_out, kernel_size=ADAPTER_STRIDE, stride=ADAPTER_STRIDE)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = downsampled_length(x.shape[1]) * ADAPTER_STRIDE - x.shape[1]
        x = F.pad(x * mask[..., None], (0, 0, 0, pad))
        mask_padded = F.pad(mask, (0, pad))
        h = F.gelu(self.mix(x.transpose(1, 2))) * mask_padded[:, None, :]
        out = self.merge(h).transpose(1, 2)
        out_mask = downsample_mask(mask)
        return out * out_mask[..., None], out_mask


class SpeechProjector(nn.Module):
    """Both streams to LLM input embeddings: adapters, per-frame concatenation, Linear to ``llm_dim``.

    semantic (B, T50, 384) and emotion (B, T50, emotion_dim) with their shared (B, T50) mask
    -> (B, ceil(T50 / 5), llm_dim) embeddings and (B, ceil(T50 / 5)) mask. Defaults: Whisper
    tiny.en's 384, the kit's 256-d emotion frames, SmolLM2-135M's 576.
    """

    def __init__(self, semantic_dim: int = 384, emotion_dim: int = 256, llm_dim: int = 576,
                 semantic_adapter_dim: int | None = None, emotion_adapter_dim: int | None = None):
        super().__init__()
        self.semantic_adapter = DownsampleAdapter(semantic_dim, semantic_adapter_dim or semantic_dim)
        self.emotion_adapter = DownsampleAdapter(emotion_dim, emotion_adapter_dim or emotion_dim)
        joint = (semantic_adapter_dim or semantic_dim) + (emotion_adapter_dim or emotion_dim)
        self.project = nn.Linear(joint, llm_dim)

    def forward(self, semantic: torch.Tensor, emotion: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if semantic.shape[:2] != emotion.shape[:2] or semantic.shape[:2] != mask.shape:
            raise ValueError(
                f"semantic {tuple(semantic.shape)}, emotion {tuple(emotion.shape)} and mask {tuple(mask.shape)} "
                "must share (batch, frames): both streams are 50 Hz frames of the same audio"
            )
        s, out_mask = self.semantic_adapter(semantic, mask)
        e, _ = self.emotion_adapter(emotion, mask)
        return self.project(torch.cat([s, e], dim=-1)) * out_mask[..., None], out_mask


def plan_emotion(model: EmotionEncoder, vectors: np.ndarray) -> str:
    """The emotion the encoder's utterance head reads in a whole plan (every token pooled); "" if empty.

    A stage-1 plan is a sequence of vectors in the encoder's frame space, so the head that names
    the emotion of an utterance's frames can be applied to it. It was trained on frames, not on
    token averages, and misreads them (see ``PlanReader``, which notebook 06 uses to name a
    plan's emotion and notebook 07 plots per token); this remains as the head's own reading.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"a plan is (tokens, dim), got shape {vectors.shape}")
    if len(vectors) == 0:
        return ""
    with torch.no_grad():
        logits = model.utterance_logits(torch.as_tensor(vectors)[None], torch.ones(1, len(vectors), dtype=torch.bool))
    return EMOTIONS[int(logits[0].argmax())]


class PlanReader:
    """Names the emotion of a whole plan with a classifier fitted on plans, not on audio frames.

    ``plan_emotion`` reads a plan with the encoder's utterance head, which was trained on 50 Hz
    frames of speech. A plan is something else: one vector per reply token, each the mean of that
    token's frames (Eq. 2), so pauses and the token-length weighting are gone. On the cpu run the
    head reads the *DTW targets* of held-out neutral replies (the plans stage 1 is trained to
    produce, from the recordings) as disgust in 135 of 146, although it reads the frames of the
    same recordings as neutral in 133 of 146. A reader of plans must be fitted on plans: this one
    is a standardised multinomial logistic regression on each plan's per-dimension mean and
    standard deviation over tokens, fitted on the training replies' DTW targets and their
    response emotions. Its accuracy on held-out targets is the ceiling of what it can tell.
    """

    def __init__(self, C: float = 1.0, seed: int = 0, max_iter: int = 3000):
        self.C, self.seed, self.max_iter = float(C), int(seed), int(max_iter)
        self._model = None

    @staticmethod
    def features(plans: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 2 D): per plan, the mean and the standard deviation of its token vectors."""
        rows = []
        for k, plan in enumerate(plans):
            plan = np.asarray(plan, dtype=np.float64)
            if plan.ndim != 2 or len(plan) == 0:
                raise ValueError(f"plan {k}: a plan is a non-empty (tokens, dim) array, got shape {plan.shape}")
            rows.append(np.concatenate([plan.mean(axis=0), plan.std(axis=0)]))
        if len({len(r) for r in rows}) > 1:
            raise ValueError("plans of different widths: every plan must live in the same emotion space")
        return np.stack(rows) if rows else np.zeros((0, 0))

    @property
    def labels(self) -> list[str]:
        self._check_fitted()
        return [str(c) for c in self._model.classes_]

    def _check_fitted(self) -> None:
        if self._model is None:
            raise RuntimeError("the plan reader is not fitted: call fit(plans, emotions) first")

    def fit(self, plans: Sequence[np.ndarray], emotions: Sequence[str]) -> "PlanReader":
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        plans, emotions = list(plans), [str(e) for e in emotions]
        if len(plans) != len(emotions):
            raise ValueError(f"{len(plans)} plans but {len(emotions)} emotions")
        if len(set(emotions)) < 2:
            raise ValueError(f"a reader needs at least two emotions to tell apart; got {sorted(set(emotions))}")
        model = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter,
                                                                   random_state=self.seed))
        with warnings.catch_warnings():  # a reader that stops at max_iter is still a valid reader
            warnings.simplefilter("ignore", category=ConvergenceWarning)
            model.fit(self.features(plans), emotions)
        self._model = model
        return self

    def predict_proba(self, plans: Sequence[np.ndarray]) -> np.ndarray:
        """(N, len(labels)) probabilities, columns in ``labels`` order; every plan must be non-empty."""
        self._check_fitted()
        plans = list(plans)
        if not plans:
            return np.zeros((0, len(self.labels)))
        return self._model.predict_proba(self.features(plans))

    def token_probabilities(self, plan: np.ndarray, window: int = 5) -> np.ndarray:
        """(tokens, len(labels)): for token i, the reading of the ``window`` tokens centred on i.

        The reader was fitted on whole plans, so a short window is a rougher reading (its spread
        rests on a few vectors); it shows where in a reply the plan changes. (0, n) if empty.
        """
        plan = np.asarray(plan, dtype=np.float32)
        if plan.ndim != 2:
            raise ValueError(f"a plan is (tokens, dim), got shape {plan.shape}")
        half = max(0, window // 2)
        return self.predict_proba([plan[max(0, i - half) : i + half + 1] for i in range(len(plan))])

    def predict(self, plans: Sequence[np.ndarray]) -> list[str]:
        """The emotion of each plan; "" for an empty plan (a reply with no tokens)."""
        self._check_fitted()
        plans = [np.asarray(p) for p in plans]
        out = [""] * len(plans)
        full = [i for i, p in enumerate(plans) if len(p)]
        if full:
            for i, label in zip(full, self._model.predict(self.features([plans[i] for i in full]))):
                out[i] = str(label)
        return out


@torch.no_grad()
def plan_emotion_probabilities(model: EmotionEncoder, vectors: np.ndarray, window: int = 5) -> np.ndarray:
    """Read an emotion *plan* (one emotion vector per reply token) with the encoder's own head.

    The plan lives in the space of the encoder's frames, so the utterance head (attentive
    pooling + linear) can read it: for token i it pools the vectors of the ``window`` tokens
    centred on i and returns the softmax over the 7 emotions. (N, 7) probabilities, columns in
    ``EMOTIONS`` order; an empty plan gives (0, 7).
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"a plan is (tokens, dim), got shape {vectors.shape}")
    if len(vectors) == 0:
        return np.zeros((0, len(EMOTIONS)), dtype=np.float32)
    half = max(0, window // 2)
    frames = torch.as_tensor(vectors)
    rows = []
    for i in range(len(vectors)):
        piece = frames[max(0, i - half) : i + half + 1][None]
        mask = torch.ones(piece.shape[:2], dtype=torch.bool)
        rows.append(torch.softmax(model.utterance_logits(piece, mask), dim=-1)[0])
    return torch.stack(rows).numpy()
