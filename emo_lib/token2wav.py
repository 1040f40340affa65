"""Token2wav: speech tokens -> 80-bin log-mel (chunk-aware causal flow matching) -> HiFi-GAN.

Stage 2 of Emotion Omni writes *discrete speech tokens* (content units + pitch and energy
tokens, all at 25 Hz); this module turns them into a waveform, one chunk at a time::

    units, pitch, energy (25 Hz) ──embed──> upsample to the mel rate (86.13 Hz)
        ──lookahead conv──> encoder (+ speaker) ──> mu (80, T): the "prior" mel
    noise x0 ~ N(0, I) ──ODE  dx/dt = v(x, t, mu, speaker), t: 0 -> 1──> x1: the mel
    mel ──HiFi-GAN (packaged, frozen)──> 22.05 kHz waveform

**Conditional flow matching (OT-CFM, Lipman et al. 2023).** Write x1 for a (normalised)
training mel and x0 ~ N(0, I) for noise. The straight "optimal-transport" path between them is::

    x_t = (1 - (1 - sigma_min) t) x0 + t x1,        t in [0, 1]
    u_t = d x_t / dt = x1 - (1 - sigma_min) x0      (the target velocity, constant along the path)

and the velocity network v_theta(x_t, t, mu, s) is trained by plain regression::

    L_flow = E_{t ~ U(0,1), x0, x1} || v_theta(x_t, t, mu, s) - u_t ||^2      (over valid frames)

At t = 0 the path is pure noise, at t = 1 it is the data (blurred by sigma_min). Sampling
integrates the learned ODE dx/dt = v_theta from noise (t = 0) to t = 1 with a fixed step
h = 1 / steps::

    Euler:     x_{n+1} = x_n + h v(x_n, t_n)                                  (1 evaluation/step)
    midpoint:  x_{n+1} = x_n + h v(x_n + h/2 v(x_n, t_n), t_n + h/2)          (2 evaluations, 2nd order)

**The prior mean mel mu.** As in Grad-TTS / Matcha-TTS the conditioning encoder outputs an
80-bin mean mel ``mu`` trained with L_prior = MSE(mu, x1), and the loss is
``L_flow + prior_weight * L_prior``. Why it helps few-step sampling: mu is the conditional mean
of the mel given the tokens, so given mu the remaining uncertainty about x1 is small (only the
fine detail that a mean smooths away). The velocity field the network must learn,
v(x, t) = E[x1 - (1 - sigma_min) x0 | x_t = x], is then close to mu - (1 - sigma_min) x0 for
every t: trajectories are nearly straight lines at nearly constant speed, and an ODE solver
with few steps (even one Euler step) lands close to where many steps would. The decoder only
adds the residual detail. And mu alone is a usable (over-smooth) mel: ``Token2Mel.prior``.

**Why chunked streaming is exact.** Frames are grouped into chunks of ``chunk_frames``. Every
Transformer layer (in the encoder and the velocity network) uses a *block-causal* mask: frame i
attends to frame j iff chunk(j) <= chunk(i) (full attention inside a chunk, causal across
chunks). The only look into the future is the *lookahead conv* on the conditioning (kernel
``lookahead_frames + 1``, right context only: its output at frame t sees inputs t .. t + L).
Hence mu on chunk k depends on conditioning frames up to end(k) + L - 1 only, and the ODE state
of a frame at step n+1 depends only on step-n states of frames in chunks <= its own. So chunk k
can be produced as soon as the conditioning up to end(k) + L has arrived, given the per-step ODE
states of the earlier frames (they are the keys and values at each step and never change once
computed). ``Token2MelStreamer`` does this with key/value caches (``KVCache``): one for the
encoder and one per solver evaluation for the velocity network, so every frame is computed
once per evaluation, as in offline sampling; ``Token2Mel.stream`` wraps it. Its concatenated
chunks equal ``Token2Mel.sample`` up to float rounding (unit tests). Algorithmic latency:
(chunk + lookahead) frames, 30 x 11.6 ms ≈ 0.35 s with the defaults. Positions are rotary
(RoPE): a cached forward rotates the new frames at their absolute positions, which continue
from the cache length. This is the design of CosyVoice 2's chunk-aware causal flow matching,
at a laptop scale.

**Two encoders for mu** (``Token2MelConfig.encoder``): a block-causal Transformer like the
velocity network (``transformer``), or a stack of *causal* residual convolutions
(``conv``, ``CausalConvEncoder``: frame t sees only frames <= t of the layer below, FiLM on the
speaker). Both see the future only through the lookahead conv, so both stream exactly; the conv
encoder's cache (``ConvCache``) holds the last kernel - 1 inputs of each layer instead of keys
and values, and needs no chunk alignment. On the cpu preset (1 500 steps) the conv encoder was
no more intelligible than the Transformer (docs/findings.md, "Notebooks 05-07"); what helped there was
``detach_prior``: the velocity network reads mu through a stop-gradient, so the encoder is
trained by the prior MSE alone.

**Sampling temperature** (``Token2MelConfig.temperature``, as in Grad-TTS and Matcha-TTS):
with ``prior_source`` training starts the flow at x0 = mu + source_std * noise; synthesis
starts it at mu + temperature * source_std * noise. Temperature 1 samples what was trained;
below 1 the flow starts nearer mu and its output stays nearer the mean of what it learned,
trading variety for clarity; 0 makes synthesis a deterministic ODE from mu. It is a sampling
setting only: ``load_token2mel(..., temperature=)`` changes it without retraining, and a
resumed training run may change it.

Rates: mel frame j covers samples from j * 256 at 22050 Hz; unit frame u covers 40 ms from
u * 0.04 s; the unit read by mel frame j is floor(j * 256 / 22050 * 25) (clipped).
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .train import CheckpointError, load_checkpoint, save_checkpoint

TOKENS_NOTEBOOK = "notebooks/05_tokens.ipynb"
TOKEN2MEL_CHECKPOINT_KIND = "token2mel"
UNIT_HZ = 25  # speech tokens per second (the same constant as emo_lib.speech_tokens.UNIT_HZ)
SAMPLE_RATE = 22050
HOP = 256
N_MELS = 80
SPEAKER_DIM = 2 * N_MELS  # mean and std of the log-mel bins over speech frames
# unit index of mel frame j = floor(j * HOP * UNIT_HZ / SAMPLE_RATE) = (j * 6400) // 22050, exact in integers
_UNITS_NUM = HOP * UNIT_HZ  # 6400
_MELS_NUM = SAMPLE_RATE  # 22050
LOG_MEL_FLOOR = math.log(1e-5)  # the log-mel value of silence (HiFi-GAN clamps magnitudes at 1e-5)
# Rough log-mel statistics of espeak-ng speech, used until ``Token2Mel.set_mel_stats`` is called.
DEFAULT_MEL_MEAN = -5.3
DEFAULT_MEL_STD = 2.8


class MelConfigError(ValueError):
    """The mel settings of the token2mel model and of the vocoder disagree."""


class SpeakerReferenceError(ValueError):
    """A speaker reference with too little speech to describe a voice."""


class Token2MelError(ValueError):
    """Inputs or settings the token2mel model cannot use (ids out of range, bad shapes, bad config)."""


# ---------------------------------------------------------------------------------------------
# Mel settings and the vocoder check
# ---------------------------------------------------------------------------------------------
@dataclass
class MelConfig:
    """The log-mel features both the token2mel model and the vocoder must agree on."""

    sr: int = SAMPLE_RATE
    n_fft: int = 1024
    hop: int = HOP
    win_size: int = 1024
    n_mels: int = N_MELS
    fmin: float = 0.0
    fmax: float = 8000.0


# our name -> the HiFi-GAN config.json name
_VOCODER_KEYS = {"sr": "sampling_rate", "n_fft": "n_fft", "hop": "hop_size", "win_size": "win_size",
                 "n_mels": "num_mels", "fmin": "fmin", "fmax": "fmax"}


def check_vocoder_config(mel_cfg: MelConfig, vocoder_config) -> None:
    """Raise ``MelConfigError`` unless the vocoder was trained on exactly these mel features.

    ``vocoder_config`` is the HiFi-GAN ``config`` dict (or a model with a ``.config``). A vocoder
    fed mels of another hop, rate or filterbank still outputs audio, just wrong audio: better to stop.
    """
    config = getattr(vocoder_config, "config", vocoder_config)
    problems = []
    for ours, theirs in _VOCODER_KEYS.items():
        want = getattr(mel_cfg, ours)
        if theirs not in config:
            problems.append(f"mel setting {ours} = {want!r} but the vocoder config has no '{theirs}'")
            continue
        have = config[theirs]
        if have is None or float(have) != float(want):
            problems.append(f"mel setting {ours} = {want!r} but the vocoder's {theirs} = {have!r}")
    if problems:
        raise MelConfigError("the vocoder expects other mel features: " + "; ".join(problems)
                             + ". Use a vocoder trained on these mels, or change MelConfig to match it.")


# ---------------------------------------------------------------------------------------------
# Frame arithmetic: 25 Hz units <-> 86.13 Hz mel frames
# ---------------------------------------------------------------------------------------------
def unit_index_of_mel_frame(j):
    """The unit read by mel frame ``j`` (int or integer array/tensor): floor(j * 256 / 22050 * 25)."""
    return (j * _UNITS_NUM) // _MELS_NUM


def mel_frames_for_units(n_units: int) -> int:
    """Mel frames covered by ``n_units`` units: the number of j with unit_index(j) < n_units.

    That is ceil(n_units * 22050 / 6400) (about 3.45 mel frames per unit); it is also the first
    mel frame of unit ``n_units``, used to crop mel and units at the same instant.
    """
    return -(-int(n_units) * _MELS_NUM // _UNITS_NUM)


def mel_unit_index(n_mel: int, n_units: int, start_unit: int = 0) -> torch.Tensor:
    """(n_mel,) long: the row of a units array that each mel frame reads.

    For a crop that starts at unit ``start_unit`` (and so at mel frame
    ``mel_frames_for_units(start_unit)``), local frame j reads unit
    unit_index(m0 + j) - start_unit, clipped to [0, n_units - 1]. With start_unit = 0 this is
    the plain map floor(j * 256 / 22050 * 25).
    """
    if n_units < 1:
        raise Token2MelError(f"need at least one unit to upsample, got n_units = {n_units}")
    m0 = mel_frames_for_units(start_unit)
    j = torch.arange(m0, m0 + int(n_mel), dtype=torch.long)
    return (unit_index_of_mel_frame(j) - int(start_unit)).clamp(0, int(n_units) - 1)


def upsample_to_mel(x: torch.Tensor, n_mel: int, start_unit: int = 0) -> torch.Tensor:
    """Repeat 25 Hz frames to the mel rate: (B, T_u, ...) -> (B, n_mel, ...) by the index map."""
    return x[:, mel_unit_index(n_mel, x.shape[1], start_unit).to(x.device)]


# ---------------------------------------------------------------------------------------------
# Speaker reference
# ---------------------------------------------------------------------------------------------
def speaker_reference(mel, min_frames: int = 86, range_db: float = 40.0, sr: int = SAMPLE_RATE,
                      hop: int = HOP) -> torch.Tensor:
    """A 160-d voice description from a reference log-mel (80, T): mean and std of each bin.

    Only speech frames count: a frame's energy is log(sum_b exp(mel_b)) (natural log of the
    summed mel magnitude), and frames within ``range_db`` of the loudest (a magnitude ratio of
    10^(range_db/20), i.e. ln(100) ≈ 4.6 nats for 40 dB) are speech. Silence would otherwise pull
    the mean towards the floor and the std up. Fewer than ``min_frames`` speech frames (86 ≈ 1 s)
    raise ``SpeakerReferenceError``: a too-short reference gives an unreliable voice.
    """
    mel = torch.as_tensor(np.asarray(mel) if not torch.is_tensor(mel) else mel, dtype=torch.float32)
    if mel.dim() != 2 or mel.shape[0] != N_MELS:
        raise SpeakerReferenceError(f"speaker reference must be a log-mel of shape ({N_MELS}, T), got {tuple(mel.shape)}")
    if mel.shape[1] == 0:
        raise SpeakerReferenceError(
            f"speaker reference is too short: 0.0 s of speech, need at least {min_frames * hop / sr:.1f} s")
    energy = torch.logsumexp(mel, dim=0)
    speech = energy >= energy.max() - range_db / 20.0 * math.log(10.0)
    n = int(speech.sum())
    if n < min_frames:
        raise SpeakerReferenceError(
            f"speaker reference is too short: {n * hop / sr:.1f} s of speech, need at least "
            f"{min_frames * hop / sr:.1f} s ({min_frames} mel frames); record or choose a longer reference")
    frames = mel[:, speech]
    return torch.cat([frames.mean(1), frames.std(1, unbiased=False)])


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
@dataclass
class Token2MelConfig:
    """Everything that fixes the shapes of a ``Token2Mel``; saved in its checkpoints."""

    n_units: int  # content-unit vocabulary (k of the k-means)
    pitch_bins: int  # pitch-token vocabulary (0 = unvoiced)
    energy_bins: int  # energy-token vocabulary
    dim: int = 256  # Transformer width
    layers: int = 4  # layers of the velocity network
    encoder_layers: int = 4  # layers of the conditioning encoder (the prior mu)
    encoder: str = "transformer"  # "transformer" (block-causal attention) | "conv" (causal residual convolutions)
    conv_kernel: int = 5  # kernel of the conv encoder's layers (each sees kernel - 1 frames back)
    heads: int = 4
    ff_mult: int = 2  # MLP width = ff_mult * dim (2, not 4: half the MLP cost on a CPU)
    dropout: float = 0.0
    chunk_frames: int = 24  # mel frames per streaming chunk (24 x 11.6 ms = 279 ms)
    lookahead_frames: int = 6  # future conditioning frames the lookahead conv sees (70 ms)
    ode_steps: int = 10  # default number of solver steps at sampling
    solver: str = "euler"  # "euler" | "midpoint"
    sigma_min: float = 1e-4  # width of the data end of the OT path
    prior_weight: float = 1.0  # weight of MSE(mu, mel) in the loss
    detach_prior: bool = False  # the velocity network reads mu without back-propagating into the encoder
    prior_source: bool = False  # start the flow at mu + source_std * noise (Grad-TTS / PriorGrad) instead of noise
    source_std: float = 1.0  # scale of the starting noise
    temperature: float = 1.0  # sampling only: x0 = mu + temperature * source_std * noise (training: temperature 1)
    n_mels: int = N_MELS
    speaker_dim: int = SPEAKER_DIM

    def __post_init__(self):
        for name in ("n_units", "pitch_bins", "energy_bins", "dim", "layers", "encoder_layers", "heads", "ff_mult",
                     "chunk_frames", "ode_steps", "n_mels", "speaker_dim"):
            if int(getattr(self, name)) < 1:
                raise Token2MelError(f"Token2MelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lookahead_frames < 0:
            raise Token2MelError(f"Token2MelConfig.lookahead_frames must be >= 0, got {self.lookahead_frames}")
        if self.encoder not in ENCODERS:
            raise Token2MelError(f"Token2MelConfig.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if int(self.conv_kernel) < 1:
            raise Token2MelError(f"Token2MelConfig.conv_kernel must be >= 1, got {self.conv_kernel}")
        if self.solver not in SOLVERS:
            raise Token2MelError(f"Token2MelConfig.solver must be one of {SOLVERS}, got {self.solver!r}")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise Token2MelError(f"Token2MelConfig.temperature must be in [0, 2], got {self.temperature}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise Token2MelError(f"dim {self.dim} must split into {self.heads} heads of even width (rotary positions)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Token2MelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise Token2MelError(f"unknown Token2MelConfig keys {unknown}; valid: {sorted(known)}")
        return cls(**values)


SOLVERS = ("euler", "midpoint")
UNIT_INITS = ("random", "centroids")  # how token2mel's unit embedding table starts (preset token2mel.unit_init)
SAMPLING_ONLY = ("temperature",)  # config keys that change synthesis, not training: resuming may change them
ENCODERS = ("transformer", "conv")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow times t in [0, 1], (B,) -> (B, dim) (Transformer/DDPM style).

    t is scaled by 1000 so the fastest of the geometric frequencies resolves small time steps.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


def block_causal_mask(n_frames: int, chunk_frames: int, valid: torch.Tensor | None = None,
                      device=None) -> torch.Tensor:
    """Boolean attention mask (True = may attend): frame i sees frame j iff chunk(j) <= chunk(i).

    Shape (1, 1, T, T), or (B, 1, T, T) when ``valid`` (B, T) also hides padded key frames.
    """
    chunk = torch.arange(n_frames, device=device) // chunk_frames
    allowed = chunk[None, :] <= chunk[:, None]  # [query i, key j]
    if valid is None:
        return allowed[None, None]
    return (allowed[None] & valid[:, None, :].bool())[:, None]


def _rotary_tables(n: int, head_dim: int, device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (n, head_dim / 2) for positions start .. start + n - 1.

    ``start`` > 0 is for a cached forward: new frames continue the positions of the cached ones.
    """
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.arange(start, start + n, device=device, dtype=torch.float32)[:, None] * inv[None]
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions (RoPE): rotate feature pairs by position-dependent angles, so q·k depends on i - j."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Block(nn.Module):
    """Pre-norm Transformer block; a per-utterance conditioning vector is added at its input."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.cond = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple, cond: torch.Tensor,
                cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        """(B, T, D) -> (B, T, D). With ``cache``, x holds only new frames: their keys and values are
        stored as layer ``layer`` of the cache and the queries attend to all cached frames plus these."""
        b, t, d = x.shape
        x = x + self.cond(cond)[:, None, :]
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        if cache is not None:
            k, v = cache.store(layer, k, v)  # now the keys/values of every frame so far, (B, H, T_cache + T, hd)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + F.dropout(self.out(a.transpose(1, 2).reshape(b, t, d)), p, self.training)
        return x + F.dropout(self.mlp(self.norm2(x)), p, self.training)


class KVCache:
    """The keys and values of every frame a ``BlockCausalTransformer`` has already processed.

    Why a cache makes streaming cheap: under the block-causal mask a frame never attends to
    later chunks, so once a chunk has been processed its per-layer keys and values are final
    (later frames cannot change them). A cached forward therefore only runs the *new* frames
    through the layers; each layer's attention reads the stored keys/values of all earlier
    frames plus those of the new frames, which it then appends. The cost of a chunk is its own
    frames x layers (plus attention over the past), instead of re-running the whole prefix.

    One cache belongs to one transformer and one sequence (a batch of B sequences of equal
    length). Layer ``i`` keeps (B, heads, length, head_dim) keys and values, already rotated
    (RoPE) at their absolute positions. Storage grows by doubling, so appending is amortised
    O(new frames), but never beyond ``max_frames`` when that is given (more frames then raise).
    Memory: 2 x dim floats per frame per layer. Inference only: the stored tensors are written
    in place, so no gradients flow through them.
    """

    def __init__(self, n_layers: int, max_frames: int | None = None):
        if n_layers < 1:
            raise Token2MelError(f"a KVCache needs at least one layer, got {n_layers}")
        self.n_layers = int(n_layers)
        self.max_frames = None if max_frames is None else int(max_frames)
        self.length = 0  # frames stored (and complete in every layer)
        self._keys: list[torch.Tensor | None] = [None] * self.n_layers
        self._values: list[torch.Tensor | None] = [None] * self.n_layers

    def __len__(self) -> int:
        return self.length

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new frames' (B, H, T, hd) keys/values after the cached ones; return all of them.

        The frames count as cached only after ``advance`` (called once all layers are done), so a
        forward that fails half-way leaves the cache as it was.
        """
        need = self.length + k.shape[2]
        if self.max_frames is not None and need > self.max_frames:
            raise Token2MelError(f"this KVCache holds at most max_frames = {self.max_frames} frames, "
                                 f"{need} were asked for")
        buf = self._keys[layer]
        if buf is not None and (buf.shape[0], buf.shape[1], buf.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
            raise Token2MelError(f"this KVCache holds (batch, heads, head_dim) = {(buf.shape[0], buf.shape[1], buf.shape[3])} "
                                 f"but the new keys have {(k.shape[0], k.shape[1], k.shape[3])}: one cache per "
                                 "sequence (batch) and per transformer")
        if buf is None or buf.shape[2] < need:  # grow to at least double: amortised O(1) per frame
            capacity = max(need, 2 * (0 if buf is None else buf.shape[2]))
            capacity = capacity if self.max_frames is None else min(capacity, self.max_frames)
            grown_k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            grown_v = v.new_empty(grown_k.shape)
            if buf is not None:
                grown_k[:, :, : self.length] = buf[:, :, : self.length]
                grown_v[:, :, : self.length] = self._values[layer][:, :, : self.length]
            self._keys[layer], self._values[layer] = grown_k, grown_v
        self._keys[layer][:, :, self.length : need] = k
        self._values[layer][:, :, self.length : need] = v
        return self._keys[layer][:, :, :need], self._values[layer][:, :, :need]

    def advance(self, n_frames: int) -> None:
        """Count ``n_frames`` newly stored frames as cached (after every layer has stored them)."""
        self.length += int(n_frames)


class BlockCausalTransformer(nn.Module):
    """A stack of ``_Block``s sharing one block-causal mask and one rotary table; (B, T, D) -> (B, T, D).

    Two ways to call it: on a whole sequence (training, offline sampling), or with a
    ``KVCache`` on the next frames of a sequence (streaming; see ``forward``).
    """

    def __init__(self, dim: int, layers: int, heads: int, ff_mult: int, dropout: float, chunk_frames: int):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim, heads, ff_mult, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.chunk_frames = chunk_frames
        self.head_dim = dim // heads

    def new_cache(self, max_frames: int | None = None) -> KVCache:
        """An empty ``KVCache`` for one sequence (batch) run through this transformer (of at most ``max_frames``)."""
        return KVCache(len(self.blocks), max_frames)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Without ``cache``: x (B, T, D) is a whole sequence. With ``cache``: x (B, T_new, D) holds
        the frames that follow the cached ones, and the result is exactly what the whole-sequence
        forward gives on those frames (to float rounding); see ``_forward_cached``."""
        if cache is not None:
            return self._forward_cached(x, cond, valid, cache)
        n = x.shape[1]
        if valid is not None and bool(valid.all()):
            valid = None  # one shared (1, 1, T, T) mask is cheaper
        mask = block_causal_mask(n, self.chunk_frames, valid, x.device)
        rope = _rotary_tables(n, self.head_dim, x.device)
        for block in self.blocks:
            x = block(x, mask, rope, cond)
        return self.norm(x)

    def _forward_cached(self, x: torch.Tensor, cond: torch.Tensor, valid, cache: KVCache) -> torch.Tensor:
        """The new frames [L, L + T) of a sequence whose frames [0, L) are in ``cache`` (L = len(cache)).

        - Positions continue from the cache: RoPE rotates the new queries/keys at L .. L + T - 1,
          matching the absolute positions the cached keys were rotated at.
        - Mask: a new frame sees every cached frame (all in earlier chunks, or in its own chunk)
          and the new frames of its own or earlier chunks, as ``block_causal_mask`` does. When the
          new frames form (part of) one chunk, that is everything: no mask at all.
        - L must be a multiple of ``chunk_frames``: if the cache ended inside a chunk, its last
          frames would have needed to see the new frames of the same chunk, which they never did.
        """
        if valid is not None:
            raise Token2MelError("a cached forward takes no padding mask: stream one batch of equal-length sequences")
        if cache.n_layers != len(self.blocks):
            raise Token2MelError(f"this KVCache has {cache.n_layers} layers but the transformer has {len(self.blocks)}: "
                                 "make caches with transformer.new_cache()")
        start, t, c = cache.length, x.shape[1], self.chunk_frames
        if start % c:
            raise Token2MelError(f"a cached forward must start at a chunk boundary (a multiple of chunk_frames = {c}), "
                                 f"but the cache holds {start} frames: the last cached chunk is unfinished and its "
                                 "frames would have had to attend to the new ones")
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise Token2MelError("the key/value cache is for inference: call the cached forward under torch.no_grad()")
        if t == 0:
            return self.norm(x)
        mask = None
        if t > c:  # the new frames span several chunks: block-causal among themselves
            query_chunk = torch.arange(start, start + t, device=x.device) // c
            key_chunk = torch.arange(start + t, device=x.device) // c
            mask = (key_chunk[None, :] <= query_chunk[:, None])[None, None]
        rope = _rotary_tables(t, self.head_dim, x.device, start=start)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, rope, cond, cache, i)
        cache.advance(t)
        return self.norm(x)


class ConvCache:
    """What a ``CausalConvEncoder`` must remember to continue a sequence: the last ``kernel - 1``
    inputs of each layer (zeros before the sequence starts, as the offline left padding)."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.tails: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0

    def __len__(self) -> int:
        return self.length


class CausalConvEncoder(nn.Module):
    """A stack of causal residual convolutions over the conditioning frames; (B, T, D) -> (B, T, D).

    Layer i: h <- h + W2 GELU(FiLM_i(LN(conv_i(h)), speaker)), where ``conv_i`` is a 1-D
    convolution of width ``kernel`` padded on the left only, so frame t sees frames t - k + 1 .. t
    of the layer below: with L layers, a receptive field of L (k - 1) + 1 frames, all in the past.
    The lookahead is the model's lookahead conv in ``condition_frames`` (before this encoder), so
    the encoder itself never waits for the future. LayerNorm is per frame (a norm over time would
    look ahead), and the speaker vector sets a per-layer scale and shift (FiLM).

    Why try a convolution for the prior mean mel: each mel frame is mostly decided by its unit
    and the few units around it (coarticulation), a convolution's inductive bias, which attention
    has to *learn*. Measured on the cpu preset, it did not pay off: with the same steps its mean
    mel was no more intelligible than the Transformer's (docs/findings.md, "Notebooks 05-07").

    Streaming: with a ``ConvCache`` (``new_cache``) the new frames continue the cached ones and
    give exactly the whole-sequence result, for any number of new frames (no chunk alignment).
    """

    def __init__(self, dim: int, layers: int, kernel: int, dropout: float = 0.0):
        super().__init__()
        self.kernel = kernel
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.film = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(layers))
        self.mixes = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.dropout = dropout

    def new_cache(self, max_frames: int | None = None) -> ConvCache:
        """An empty ``ConvCache`` for one sequence (batch); ``max_frames`` is accepted like
        ``BlockCausalTransformer.new_cache`` but unused: the cache never grows."""
        return ConvCache(len(self.convs))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor | None = None,
                cache: ConvCache | None = None) -> torch.Tensor:
        """x (B, T, D) conditioning frames, cond (B, D) speaker vector -> (B, T, D).

        ``valid`` (B, T) zeroes padded frames at every layer (they come after the real frames
        and a causal conv never reads ahead, so they change nothing). With ``cache``: x holds
        the frames after the cached ones (inference only, no padding).
        """
        if cache is not None:
            if valid is not None:
                raise Token2MelError("a cached forward takes no padding mask: stream one batch of equal-length sequences")
            if cache.n_layers != len(self.convs):
                raise Token2MelError(f"this ConvCache has {cache.n_layers} layers but the encoder has {len(self.convs)}: "
                                     "make caches with encoder.new_cache()")
        if x.shape[1] == 0:
            return self.norm(x)
        keep = None if valid is None else valid[..., None].to(x.dtype)
        b, t, d = x.shape
        p = self.dropout if self.training else 0.0
        for i, (conv, norm, film, mix) in enumerate(zip(self.convs, self.norms, self.film, self.mixes)):
            h = x if keep is None else x * keep
            h = h.transpose(1, 2)  # (B, D, T)
            if cache is None:
                h = F.pad(h, (self.kernel - 1, 0))
            else:
                tail = cache.tails[i]
                if tail is None:
                    tail = h.new_zeros(b, d, self.kernel - 1)
                h = torch.cat([tail, h], dim=-1)
                cache.tails[i] = h[..., h.shape[-1] - (self.kernel - 1):]  # empty for kernel 1
            h = norm(conv(h).transpose(1, 2))  # (B, T, D)
            scale, shift = film(cond).chunk(2, dim=-1)
            h = h * (1 + scale[:, None, :]) + shift[:, None, :]
            x = x + F.dropout(mix(F.gelu(h)), p, self.training)
        if cache is not None:
            cache.length += t
        return self.norm(x)


def solver_evaluations(steps: int, solver: str) -> int:
    """Velocity evaluations of one ODE solve: ``steps`` for Euler, 2 x ``steps`` for midpoint."""
    if steps < 1:
        raise Token2MelError(f"ode steps must be >= 1, got {steps} (use Token2Mel.prior for the mean mel)")
    if solver not in SOLVERS:
        raise Token2MelError(f"solver must be one of {SOLVERS}, got {solver!r}")
    return steps * (1 if solver == "euler" else 2)


def integrate(x0: torch.Tensor, v, steps: int, solver: str) -> torch.Tensor:
    """Solve dx/dt = v from t = 0 to 1 in ``steps`` fixed steps h = 1 / steps, starting at x0.

    ``v(x, t, j)`` returns the velocity at state x and time t; ``j`` = 0, 1, 2, ... numbers the
    evaluations in the order the solver makes them (step n: Euler j = n; midpoint j = 2n at
    (x_n, t_n) and 2n + 1 at the half step). Streaming uses j to pick the state of the earlier
    frames at the same evaluation (a key/value cache or a stored history).
    """
    solver_evaluations(steps, solver)  # checks steps and solver
    x, h = x0, 1.0 / steps
    for n in range(steps):
        t = n * h
        if solver == "euler":
            x = x + h * v(x, t, n)
        else:
            x = x + h * v(x + 0.5 * h * v(x, t, 2 * n), t + 0.5 * h, 2 * n + 1)
    return x


def _as_batch(x, name: str, dtype) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise Token2MelError(f"{name} must have shape (T,) or (B, T), got {tuple(x.shape)}")
    return x.to(dtype)


class Token2Mel(nn.Module):
    """Units + pitch + energy tokens (25 Hz) + a speaker reference -> log-mel (B, 80, T).

    Two block-causal Transformers: the conditioning *encoder* (tokens -> prior mean mel ``mu``)
    and the *velocity network* v(x_t, t, mu, speaker) of the flow. Both work on normalised mels
    (x - mel_mean) / mel_std; ``set_mel_stats`` stores the data's statistics (saved with the
    weights). Call ``.eval()`` before sampling if ``dropout`` > 0.
    """

    def __init__(self, config: Token2MelConfig | None = None, **overrides):
        super().__init__()
        if config is None:
            config = Token2MelConfig(**overrides)
        elif overrides:
            config = Token2MelConfig.from_dict({**config.to_dict(), **overrides})
        self.config = c = config
        self.unit_embedding = nn.Embedding(c.n_units, c.dim)
        self.pitch_embedding = nn.Embedding(c.pitch_bins, c.dim)
        self.energy_embedding = nn.Embedding(c.energy_bins, c.dim)
        self.lookahead = nn.Conv1d(c.dim, c.dim, c.lookahead_frames + 1)  # padded on the right only
        self.speaker = nn.Sequential(nn.Linear(c.speaker_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        if c.encoder == "conv":
            self.encoder = CausalConvEncoder(c.dim, c.encoder_layers, c.conv_kernel, c.dropout)
        else:
            self.encoder = BlockCausalTransformer(c.dim, c.encoder_layers, c.heads, c.ff_mult, c.dropout, c.chunk_frames)
        self.to_mu = nn.Linear(c.dim, c.n_mels)
        self.input = nn.Linear(2 * c.n_mels, c.dim)  # [x_t; mu]
        self.time = nn.Sequential(nn.Linear(c.dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.estimator = BlockCausalTransformer(c.dim, c.layers, c.heads, c.ff_mult, c.dropout, c.chunk_frames)
        self.to_velocity = nn.Linear(c.dim, c.n_mels)
        self.register_buffer("mel_mean", torch.full((c.n_mels,), DEFAULT_MEL_MEAN))
        self.register_buffer("mel_std", torch.full((c.n_mels,), DEFAULT_MEL_STD))

    # -- normalisation and state -----------------------------------------------------------------
    def set_mel_stats(self, mean, std) -> None:
        """Store per-bin log-mel mean and std (e.g. from ``mel_statistics`` over the training mels)."""
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32).reshape(-1)
        if mean.shape != self.mel_mean.shape or std.shape != self.mel_std.shape:
            raise Token2MelError(f"mel stats must have {self.config.n_mels} values, got {tuple(mean.shape)}, {tuple(std.shape)}")
        self.mel_mean.copy_(mean)
        self.mel_std.copy_(std.clamp(min=1e-3))

    def normalize(self, mel: torch.Tensor) -> torch.Tensor:
        return (mel - self.mel_mean[:, None]) / self.mel_std[:, None]

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mel_std[:, None] + self.mel_mean[:, None]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """One group, ``token2mel``, for ``train.train_loop`` (cfg['lr']['token2mel'])."""
        return {"token2mel": list(self.parameters())}

    def trainable_state(self) -> dict:
        """Everything a checkpoint must hold: all weights and the mel statistics (CPU copies)."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def load_trainable_state(self, state: dict) -> None:
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise Token2MelError(f"token2mel state does not match this model (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise Token2MelError(f"token2mel tensor {k} has shape {tuple(v.shape)} in the checkpoint but "
                                     f"{tuple(own[k].shape)} in this model (another dim or vocabulary?)")
        self.load_state_dict(state)

    def init_unit_embedding(self, centroids) -> None:
        """Start the unit embedding table from the k-means centroids instead of random vectors.

        Unit ids are arbitrary labels, but the units are points in Whisper's frame space: unit 17
        may sound almost like unit 203. A random table hides that, and token2mel must learn it
        from data, unit by unit (the rarer a unit, the worse). Here each row starts as its
        centroid's coordinates on the centroids' top principal directions (PCA to ``dim``, or
        fewer, padded with zeros), scaled to unit variance like ``nn.Embedding``'s default, so
        units that sound alike start alike. The table stays trainable.
        ``benchmarks/unit_content.py`` measures why: a probe reading the centroids spells the words
        far better than one learning a table for the same ids at the same budget.
        """
        c = self.config
        centroids = torch.as_tensor(np.asarray(centroids) if not torch.is_tensor(centroids) else centroids,
                                    dtype=torch.float32).detach().cpu()
        if centroids.dim() != 2 or centroids.shape[0] != c.n_units:
            raise Token2MelError(f"need one centroid per unit, ({c.n_units}, D), got {tuple(centroids.shape)}: "
                                 f"the k-means and token2mel disagree on the vocabulary")
        if not torch.isfinite(centroids).all():
            raise Token2MelError("the centroids hold NaN or inf: refit the k-means")
        centered = centroids - centroids.mean(0, keepdim=True)
        _, _, vt = torch.linalg.svd(centered.double(), full_matrices=False)
        k = min(c.dim, vt.shape[0])
        coords = (centered.double() @ vt[:k].T).float()  # (n_units, k), decreasing variance
        table = torch.zeros(c.n_units, c.dim)
        table[:, :k] = coords / coords.std().clamp(min=1e-8)
        with torch.no_grad():
            self.unit_embedding.weight.copy_(table.to(self.unit_embedding.weight.device))

    def start_unit_embedding(self, how: str, centroids=None) -> None:
        """Apply the preset's ``token2mel.unit_init``: ``random`` keeps the default table, ``centroids``
        calls ``init_unit_embedding(centroids)`` (the k-means centroids of the run's units)."""
        if how not in UNIT_INITS:
            raise Token2MelError(f"token2mel.unit_init must be one of {UNIT_INITS}, got {how!r}")
        if how == "centroids":
            if centroids is None:
                raise Token2MelError("token2mel.unit_init = 'centroids' needs the k-means centroids (notebook 05)")
            self.init_unit_embedding(centroids)

    # -- conditioning ------------------------------------------------------------------------------
    def _check_ids(self, name: str, ids: torch.Tensor, size: int) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise Token2MelError(f"{name} id {bad} is outside [0, {size}): tokens and model come from different "
                                 f"tokenizers (model {name} vocabulary {size})")

    def speaker_vector(self, spk_ref: torch.Tensor) -> torch.Tensor:
        """(B, 160) or (160,) reference stats -> (B, dim); the stats are normalised like the mels first."""
        spk = torch.as_tensor(spk_ref, dtype=torch.float32, device=self.mel_mean.device)
        if spk.dim() == 1:
            spk = spk[None]
        if spk.shape[-1] != self.config.speaker_dim:
            raise Token2MelError(f"speaker reference must have {self.config.speaker_dim} values, got {spk.shape[-1]}")
        n = self.config.n_mels
        spk = torch.cat([(spk[:, :n] - self.mel_mean) / self.mel_std, spk[:, n:] / self.mel_std], dim=1)
        return self.speaker(spk)

    def condition_frames(self, units, pitch, energy, n_mel: int, unit_index: torch.Tensor | None = None,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings at the mel rate after the lookahead conv: (B, n_mel, dim).

        ``unit_index`` (B, n_mel) says which unit row each mel frame reads (crops); default the
        plain map. Invalid (padded) frames are zeroed before the conv so that the last real
        frames see zeros to their right, exactly as at the end of an unpadded utterance.
        """
        c = self.config
        device = self.mel_mean.device
        units, pitch, energy = (_as_batch(x, name, torch.long).to(device)
                                for x, name in ((units, "units"), (pitch, "pitch"), (energy, "energy")))
        if not units.shape == pitch.shape == energy.shape:
            raise Token2MelError(f"units, pitch and energy must have the same shape, got {tuple(units.shape)}, "
                                 f"{tuple(pitch.shape)}, {tuple(energy.shape)}")
        self._check_ids("unit", units, c.n_units)
        self._check_ids("pitch", pitch, c.pitch_bins)
        self._check_ids("energy", energy, c.energy_bins)
        tokens = self.unit_embedding(units) + self.pitch_embedding(pitch) + self.energy_embedding(energy)
        if unit_index is None:
            h = upsample_to_mel(tokens, n_mel)
        else:
            h = torch.gather(tokens, 1, unit_index.to(device)[..., None].expand(-1, -1, c.dim))
        if valid is not None:
            h = h * valid[..., None].to(h.dtype)
        look = self.lookahead(F.pad(h.transpose(1, 2), (0, c.lookahead_frames))).transpose(1, 2)
        return h + F.gelu(look)

    def encode(self, frames: torch.Tensor, spk: torch.Tensor, valid: torch.Tensor | None = None,
               cache: "KVCache | ConvCache | None" = None) -> torch.Tensor:
        """Conditioning frames (B, T, dim) + speaker vector (B, dim) -> normalised prior mu (B, 80, T).

        With ``cache`` (from ``self.encoder.new_cache()``) the frames continue the cached ones.
        """
        return self.to_mu(self.encoder(frames, spk, valid, cache)).transpose(1, 2)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, mu: torch.Tensor, spk: torch.Tensor,
                 valid: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """v_theta(x_t, t, mu, speaker): (B, 80, T) normalised mels, t (B,) -> velocity (B, 80, T).

        With ``cache`` (from ``self.estimator.new_cache()``) x and mu hold the frames that follow
        the cached ones, and the cache must hold the earlier frames *at the same flow time t*.
        """
        if self.config.detach_prior:
            mu = mu.detach()  # the encoder learns from the prior MSE alone; the flow refines what it gets
        h = self.input(torch.cat([x, mu], dim=1).transpose(1, 2))
        cond = self.time(timestep_embedding(t, self.config.dim)) + spk
        return self.to_velocity(self.estimator(h, cond, valid, cache)).transpose(1, 2)

    # -- training ----------------------------------------------------------------------------------
    def loss(self, units, pitch, energy, mel, spk_ref, mel_mask, unit_index: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> dict:
        """OT-CFM loss + prior loss over valid frames: dict(loss, flow, prior) of scalar tensors.

        mel (B, 80, T) log-mel, mel_mask (B, T) True on real frames, units/pitch/energy (B, T_u).
        t ~ U(0, 1) per utterance and x0 ~ N(0, I) come from ``generator`` (else torch's global RNG).
        """
        c = self.config
        device = self.mel_mean.device
        mel = torch.as_tensor(mel, dtype=torch.float32, device=device)
        valid = torch.as_tensor(mel_mask, device=device).bool()
        if mel.dim() != 3 or mel.shape[1] != c.n_mels or valid.shape != (mel.shape[0], mel.shape[2]):
            raise Token2MelError(f"mel must be (B, {c.n_mels}, T) with mel_mask (B, T), got {tuple(mel.shape)} "
                                 f"and {tuple(valid.shape)}")
        b, _, n = mel.shape
        x1 = self.normalize(mel)
        spk = self.speaker_vector(spk_ref)
        mu = self.encode(self.condition_frames(units, pitch, energy, n, unit_index, valid), spk, valid)
        gen_device = generator.device if generator is not None else device
        t = torch.rand(b, generator=generator, device=gen_device).to(device)
        x0 = self.source(torch.randn(x1.shape, generator=generator, device=gen_device).to(device), mu)
        scale = 1.0 - c.sigma_min
        tt = t[:, None, None]
        x_t = (1.0 - scale * tt) * x0 + tt * x1
        target = x1 - scale * x0
        v = self.velocity(x_t, t, mu, spk, valid)
        weight = valid[:, None, :].to(mel.dtype)
        denom = weight.sum().clamp(min=1.0) * c.n_mels
        flow = ((v - target) ** 2 * weight).sum() / denom
        prior = ((mu - x1) ** 2 * weight).sum() / denom
        return {"loss": flow + c.prior_weight * prior, "flow": flow, "prior": prior}

    # -- sampling ----------------------------------------------------------------------------------
    def source(self, noise: torch.Tensor, mu: torch.Tensor, sampling: bool = False) -> torch.Tensor:
        """The flow's starting point x0 from standard noise (normalised mel space).

        Plain flow matching starts at x0 = noise ~ N(0, I). With ``prior_source`` it starts at
        x0 = mu + source_std * noise: a Gaussian *centred on the prior mean mel* (the source
        distribution of Grad-TTS, and PriorGrad's data-dependent prior). The path to the data is
        then short: the network only has to add the detail that mu misses, so a briefly
        trained flow (the cpu preset trains for minutes) already improves on mu instead of
        having to carry pure noise all the way to speech. ``mu`` is detached: the prior is
        trained by its own MSE only. ``noise`` covers the last frames of ``mu``.

        ``sampling=True`` (synthesis, not training) scales the noise by ``config.temperature``, the
        sampling temperature of Grad-TTS and Matcha-TTS: below 1 the samples stay closer to the
        mean of what the flow learned, trading variety for clarity; 0 makes synthesis a
        deterministic ODE from mu.
        """
        c = self.config
        x0 = c.source_std * (float(c.temperature) if sampling else 1.0) * noise
        if c.prior_source:
            x0 = x0 + mu[..., mu.shape[-1] - noise.shape[-1]:].detach()
        return x0

    def _solve(self, x0: torch.Tensor, mu: torch.Tensor, spk: torch.Tensor, valid, steps: int, solver: str,
               history: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Integrate dx/dt = v from t = 0 to 1 for the frames of ``x0`` (the last frames of ``mu``).

        ``history`` holds, for every velocity evaluation of the solver, the states of the earlier
        frames at that evaluation (streaming by recomputation, ``stream_recompute``); they are
        prepended and the network re-runs on them. Returns the final states and this call's
        states at every evaluation (to extend the history).
        """
        solver_evaluations(steps, solver)  # checks steps and solver
        b = x0.shape[0]
        n_past = 0 if history is None else history[0].shape[-1]
        inputs: list[torch.Tensor] = []

        def v(x: torch.Tensor, t: float, j: int) -> torch.Tensor:
            full = x if history is None else torch.cat([history[j], x], dim=-1)
            inputs.append(x)
            return self.velocity(full, torch.full((b,), t, device=x.device), mu, spk, valid)[..., n_past:]

        return integrate(self.source(x0, mu, sampling=True), v, steps, solver), inputs

    def _prepare(self, units, spk_ref, unit_lengths=None):
        units = _as_batch(units, "units", torch.long)
        if units.shape[1] == 0:
            raise Token2MelError("cannot synthesise an empty token sequence (0 units)")
        n = mel_frames_for_units(units.shape[1])
        valid = None
        if unit_lengths is not None:
            lengths = torch.as_tensor(unit_lengths, dtype=torch.long).reshape(-1)
            mel_lengths = torch.tensor([mel_frames_for_units(int(u)) for u in lengths])
            valid = (torch.arange(n)[None] < mel_lengths[:, None]).to(self.mel_mean.device)
        spk = self.speaker_vector(spk_ref)
        if spk.shape[0] == 1 and units.shape[0] > 1:
            spk = spk.expand(units.shape[0], -1)
        return units, n, valid, spk

    def _noise(self, shape: tuple, noise, generator) -> torch.Tensor:
        device = self.mel_mean.device
        if noise is None:
            gen_device = generator.device if generator is not None else device
            return torch.randn(shape, generator=generator, device=gen_device).to(device)
        noise = torch.as_tensor(noise, dtype=torch.float32, device=device)
        if noise.dim() == 2:
            noise = noise[None]
        if tuple(noise.shape) != tuple(shape):
            raise Token2MelError(f"noise must have shape {tuple(shape)} (B, n_mels, mel frames), got {tuple(noise.shape)}")
        return noise

    @torch.no_grad()
    def prior(self, units, pitch, energy, spk_ref, unit_lengths=None) -> torch.Tensor:
        """The prior mean mel mu (B, 80, T) as a log-mel: the 0-step, over-smooth output."""
        units, n, valid, spk = self._prepare(units, spk_ref, unit_lengths)
        mu = self.encode(self.condition_frames(units, pitch, energy, n, valid=valid), spk, valid)
        return self._finish(mu, valid)

    def _finish(self, x: torch.Tensor, valid) -> torch.Tensor:
        mel = self.denormalize(x)
        if valid is not None:
            mel = mel.masked_fill(~valid[:, None, :], LOG_MEL_FLOOR)
        return mel

    @torch.no_grad()
    def sample(self, units, pitch, energy, spk_ref, steps: int | None = None, solver: str | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               unit_lengths=None) -> torch.Tensor:
        """Offline synthesis: tokens (T_u,) or (B, T_u) -> log-mel (B, 80, mel_frames_for_units(T_u)).

        The noise x0 (B, 80, T) is ``noise`` or drawn for the whole length from ``generator``, so
        ``stream`` with the same noise gives the same mel. ``unit_lengths`` (B,) marks padded
        utterances; their frames past the end are set to silence (log 1e-5).
        """
        c = self.config
        units, n, valid, spk = self._prepare(units, spk_ref, unit_lengths)
        mu = self.encode(self.condition_frames(units, pitch, energy, n, valid=valid), spk, valid)
        x0 = self._noise((units.shape[0], c.n_mels, n), noise, generator)
        x, _ = self._solve(x0, mu, spk, valid, c.ode_steps if steps is None else steps, solver or c.solver)
        return self._finish(x, valid)

    @torch.no_grad()
    def stream(self, units, pitch, energy, spk_ref, noise: torch.Tensor | None = None, steps: int | None = None,
               solver: str | None = None, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Streaming synthesis of a known token sequence: yields log-mel chunks (B, 80, <= chunk_frames).

        A thin wrapper over ``Token2MelStreamer`` (key/value-cached, each frame run once per
        solver evaluation): all tokens are pushed at once, the chunks that push makes are
        yielded, then those of ``finish``. The noise is ``noise`` (B, 80, T) or drawn for the whole
        length from ``generator`` exactly as ``sample`` draws it, so the concatenated chunks equal
        ``sample`` with the same noise (to float rounding). Utterances in a batch must have the
        same length (no padding). Nothing is computed until the first chunk is asked for. For
        tokens that arrive piece by piece, use ``Token2MelStreamer`` directly.
        """
        c = self.config
        units, n, _, _ = self._prepare(units, spk_ref)  # checks: non-empty, speaker reference size
        spk = torch.as_tensor(np.asarray(spk_ref) if not torch.is_tensor(spk_ref) else spk_ref, dtype=torch.float32)
        spk = spk[None] if spk.dim() == 1 else spk
        if spk.shape[0] == 1 and units.shape[0] > 1:
            spk = spk.expand(units.shape[0], -1)
        x0 = self._noise((units.shape[0], c.n_mels, n), noise, generator)
        streamer = Token2MelStreamer(self, spk, noise=x0, steps=steps, solver=solver)
        yield from streamer.push(units, pitch, energy)
        yield from streamer.finish()

    @torch.no_grad()
    def stream_recompute(self, units, pitch, energy, spk_ref, noise: torch.Tensor | None = None,
                         steps: int | None = None, solver: str | None = None,
                         generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """The reference streaming algorithm, by recomputation (quadratic cost): same outputs as ``stream``.

        Chunk k (mel frames [s, e)) uses only the conditioning frames [0, e + lookahead): the
        units up to unit_index(e + lookahead - 1). The encoder and the velocity network are re-run
        on frames [0, e) (exact under block-causal attention), with the earlier frames' ODE
        states of every solver evaluation kept as their inputs. So frames of chunk 0 are run
        K times for K chunks: a 5 s utterance costs about 9x offline sampling. Kept as an
        independent check of ``Token2MelStreamer`` and to measure what its cache saves.
        """
        c = self.config
        units, n, _, spk = self._prepare(units, spk_ref)
        pitch, energy = _as_batch(pitch, "pitch", torch.long), _as_batch(energy, "energy", torch.long)
        x0 = self._noise((units.shape[0], c.n_mels, n), noise, generator)
        steps, solver = c.ode_steps if steps is None else steps, solver or c.solver
        history: list[torch.Tensor] | None = None
        for start in range(0, n, c.chunk_frames):
            end = min(start + c.chunk_frames, n)
            arrived = min(end + c.lookahead_frames, n)  # conditioning frames needed for this chunk
            k = int(unit_index_of_mel_frame(arrived - 1)) + 1  # units that have arrived
            frames = self.condition_frames(units[:, :k], pitch[:, :k], energy[:, :k], arrived)[:, :end]
            mu = self.encode(frames, spk)
            x, inputs = self._solve(x0[..., start:end], mu, spk, None, steps, solver, history)
            history = inputs if history is None else [torch.cat([h, i], dim=-1) for h, i in zip(history, inputs)]
            yield self.denormalize(x)


# ---------------------------------------------------------------------------------------------
# Streaming with key/value caches: tokens in as they are decoded, mel chunks out
# ---------------------------------------------------------------------------------------------
DEFAULT_STREAM_SECONDS = 120.0  # noise is pre-drawn for this much audio when neither noise nor max_frames is given


class Token2MelStreamer:
    """Mel chunks from speech tokens that arrive a few at a time, each frame computed once.

    ::

        streamer = Token2MelStreamer(model, spk_ref, generator=torch.Generator().manual_seed(0))
        for units, pitch, energy in decoded_pieces:          # 1-D int arrays, any length (also 0)
            for chunk in streamer.push(units, pitch, energy):
                play(chunk)                                   # (80, <= chunk_frames) log-mel
        for chunk in streamer.finish():                       # the end: the last chunk(s)
            play(chunk)

    **When a chunk is ready.** Chunk k covers mel frames [s, e) = [k C, (k + 1) C) (C =
    ``chunk_frames``). Its conditioning needs frames up to e + L - 1 (L = ``lookahead_frames``,
    the lookahead conv), i.e. the units up to unit_index_of_mel_frame(e + L - 1). ``push`` returns
    every chunk whose units have all arrived, and no other. Chunks near the end need frames
    past the last unit: only ``finish`` knows the utterance ends there (and that the lookahead
    conv sees zeros beyond it, as in ``sample``), so it returns them, the last one partial.

    **Why it is exact and cheap: one key/value cache per network and solver evaluation.**
    Under block-causal attention, nothing a chunk computes changes once later chunks arrive.

    - The encoder (tokens -> mu) keeps one ``KVCache``: chunk k's conditioning frames attend to
      the cached keys/values of chunks < k, and are then appended.
    - The velocity network is evaluated ``E`` times per ODE solve (Euler: ``steps``; midpoint:
      2 per step). At evaluation j, the keys/values of earlier frames are those computed from
      *their state at evaluation j* (same flow time t_j, same ODE state x_j). So there is one
      cache per evaluation: solving chunk k's ODE, evaluation j runs only chunk k's frames
      through the network, reading and then extending cache j.

    Each frame therefore passes once through the encoder and once per solver evaluation through
    the velocity network: the same work as ``sample`` (``Token2Mel.stream_recompute`` re-runs
    the whole prefix for every chunk). The conditioning of a chunk is computed from a window of
    tokens (its frames plus the L after), not from the start. Chunks ready at the same push are
    computed together, at most ``max_chunks_per_forward`` per forward (block-causal among
    themselves): same results, but bigger matrix products and fewer Python steps. On a CPU a
    24-frame forward costs per frame ~1.6x a 400-frame one, so one chunk per push runs at
    ~3x the offline cost (still ~0.3 x real time on one core), all tokens at once at ~1x.

    **Noise.** The flow's start x0 is drawn once, for ``max_frames`` mel frames (default
    ``noise``'s length, else 120 s), from ``generator``; frame j of the output starts from
    ``noise[..., j]``. Hence the concatenated chunks equal
    ``model.sample(all tokens, noise=streamer.noise[..., :n])`` to float rounding. Torch fills
    the noise bin by bin, so the values depend on ``max_frames``: compare with the same one.

    **Batches.** ``spk_ref`` (160,) streams one utterance: push 1-D tokens, get (80, T) chunks.
    ``spk_ref`` (B, 160) streams B utterances of equal length in lockstep: push (B, d) tokens,
    get (B, 80, T) chunks (``Token2Mel.stream`` uses this).

    **Memory.** The caches hold 2 x dim floats per frame, per layer, for the encoder and for each
    of the E evaluations: (1 + E) x layers x 2 x dim x 4 bytes per frame, ≈ 90 kB per frame
    (8 MB per second of audio; 0.9 GB for a 2-minute reply) with the defaults (dim 256, 4
    layers, 10 Euler steps). The caches grow with the utterance, never beyond ``max_frames``.

    Call ``model.eval()`` first if it has dropout. A streamer serves one utterance (batch);
    ``push`` after ``finish`` raises: make a new streamer for the next one.
    """

    max_chunks_per_forward = 16  # 384 frames with the defaults; bounds the attention memory of a big push

    def __init__(self, model: Token2Mel, spk_ref, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, max_frames: int | None = None,
                 steps: int | None = None, solver: str | None = None):
        c = model.config
        self.model = model
        self.steps = c.ode_steps if steps is None else int(steps)
        self.solver = solver or c.solver
        evaluations = solver_evaluations(self.steps, self.solver)
        spk = torch.as_tensor(np.asarray(spk_ref) if not torch.is_tensor(spk_ref) else spk_ref, dtype=torch.float32)
        if spk.dim() not in (1, 2):
            raise Token2MelError(f"spk_ref must have shape ({c.speaker_dim},) or (B, {c.speaker_dim}), got {tuple(spk.shape)}")
        self.batched = spk.dim() == 2
        with torch.no_grad():
            self.spk = model.speaker_vector(spk)  # (B, dim)
        self.batch_size = b = self.spk.shape[0]
        device = model.mel_mean.device
        if noise is not None:
            if generator is not None:
                raise Token2MelError("give either noise or a generator to draw it from, not both")
            noise = torch.as_tensor(np.asarray(noise) if not torch.is_tensor(noise) else noise, dtype=torch.float32,
                                    device=device)
            noise = noise[None] if noise.dim() == 2 else noise
            if noise.dim() != 3 or noise.shape[:2] != (b, c.n_mels):
                raise Token2MelError(f"noise must have shape ({b}, {c.n_mels}, max_frames) for {b} utterance(s), "
                                     f"got {tuple(noise.shape)}")
            if max_frames is not None and int(max_frames) > noise.shape[-1]:
                raise Token2MelError(f"max_frames = {max_frames} but the noise covers only {noise.shape[-1]} frames")
            self.max_frames = noise.shape[-1] if max_frames is None else int(max_frames)
            self.noise = noise[..., : self.max_frames]
        else:
            self.max_frames = (math.ceil(DEFAULT_STREAM_SECONDS * SAMPLE_RATE / HOP) if max_frames is None
                               else int(max_frames))
            if self.max_frames < 1:
                raise Token2MelError(f"max_frames must be >= 1, got {max_frames}")
            self.noise = model._noise((b, c.n_mels, self.max_frames), None, generator)
        self._tokens = torch.zeros(b, 3, 0, dtype=torch.long)  # rows: unit, pitch, energy (CPU)
        self._encoder_cache = model.encoder.new_cache(self.max_frames)
        self._velocity_caches = [model.estimator.new_cache(self.max_frames) for _ in range(evaluations)]
        self.emitted = 0  # mel frames handed out so far (always a multiple of chunk_frames until finish)
        self.finished = False

    @property
    def n_units(self) -> int:
        """Token frames received so far."""
        return int(self._tokens.shape[-1])

    def push(self, units, pitch, energy) -> list[torch.Tensor]:
        """Append newly decoded 25 Hz token frames; return the mel chunks that became computable.

        units, pitch, energy: (d,) int arrays/tensors (or (B, d) for a batched streamer), d >= 0.
        Returns a list (maybe empty) of log-mel chunks (80, chunk_frames) ((B, 80, chunk_frames)
        when batched), in order. Ids out of range, unequal lengths and more frames than the
        noise covers raise ``Token2MelError`` and leave the streamer unchanged.
        """
        if self.finished:
            raise Token2MelError("push after finish(): this utterance is over; make a new Token2MelStreamer")
        new = self._check_tokens(units, pitch, energy)
        available = mel_frames_for_units(self.n_units + new.shape[-1])  # frames whose unit has arrived
        if available > self.max_frames:
            raise Token2MelError(
                f"the tokens now cover {available} mel frames ({available * HOP / SAMPLE_RATE:.1f} s), more than "
                f"max_frames = {self.max_frames} ({self.max_frames * HOP / SAMPLE_RATE:.1f} s) for which noise was "
                "drawn; make the streamer with a larger max_frames (or longer noise)")
        self._tokens = torch.cat([self._tokens, new], dim=-1)
        c = self.model.config
        ready = self.emitted  # chunk [ready, ready + C) is computable iff ready + C + L <= available
        while ready + c.chunk_frames + c.lookahead_frames <= available:
            ready += c.chunk_frames
        return self._emit(ready, ready + c.lookahead_frames)

    def finish(self) -> list[torch.Tensor]:
        """The tokens have ended: return the remaining chunks ([] if none), the last one partial."""
        if self.finished:
            raise Token2MelError("finish() was already called for this utterance; make a new Token2MelStreamer")
        self.finished = True
        n = mel_frames_for_units(self.n_units)  # 0 for no units: nothing to say
        return self._emit(n, n)

    # -- internals -----------------------------------------------------------------------------
    def _check_tokens(self, units, pitch, energy) -> torch.Tensor:
        """(B, 3, d) long CPU tensor of the new frames, after checking shapes and id ranges."""
        m, c, b = self.model, self.model.config, self.batch_size
        rows = []
        for x, name, size in ((units, "unit", c.n_units), (pitch, "pitch", c.pitch_bins), (energy, "energy", c.energy_bins)):
            x = _as_batch(x, name, torch.long).detach().cpu()
            if x.shape[0] != b:
                raise Token2MelError(f"{name} tokens must have shape (d,) for one utterance or ({b}, d) for this "
                                     f"batch of {b}, got {tuple(x.shape)}")
            m._check_ids(name, x, size)
            rows.append(x)
        if not rows[0].shape == rows[1].shape == rows[2].shape:
            raise Token2MelError(f"units, pitch and energy must have the same length, got {rows[0].shape[-1]}, "
                                 f"{rows[1].shape[-1]}, {rows[2].shape[-1]}")
        return torch.stack(rows, dim=1)

    def _emit(self, end: int, known: int) -> list[torch.Tensor]:
        """Chunks for frames [emitted, end); conditioning frames [0, known) may be used (zeros after)."""
        step = self.max_chunks_per_forward * self.model.config.chunk_frames
        chunks: list[torch.Tensor] = []
        while self.emitted < end:
            start, stop = self.emitted, min(self.emitted + step, end)
            mel = self._frames(start, stop, min(stop + self.model.config.lookahead_frames, known))
            pieces = mel.split(self.model.config.chunk_frames, dim=-1)
            chunks.extend(pieces if self.batched else [p[0] for p in pieces])
            self.emitted = stop
        return chunks

    @torch.no_grad()
    def _frames(self, start: int, stop: int, window_end: int) -> torch.Tensor:
        """Log-mel (B, 80, stop - start) for frames [start, stop), chunk-aligned start.

        Conditioning: the token embeddings of frames [start, window_end) (window_end = stop + L,
        or the utterance's end), through the lookahead conv; its outputs for [start, stop) see
        exactly what they see in ``sample``. Then mu via the encoder cache, then the ODE with
        evaluation j using velocity cache j.
        """
        m = self.model
        u0 = int(unit_index_of_mel_frame(start))
        u1 = int(unit_index_of_mel_frame(window_end - 1)) + 1
        units, pitch, energy = self._tokens[:, :, u0:u1].unbind(1)
        index = unit_index_of_mel_frame(torch.arange(start, window_end)) - u0  # the row each frame reads
        frames = m.condition_frames(units, pitch, energy, window_end - start,
                                    unit_index=index[None].expand(self.batch_size, -1))[:, : stop - start]
        mu = m.encode(frames, self.spk, cache=self._encoder_cache)
        b = self.batch_size

        def v(x: torch.Tensor, t: float, j: int) -> torch.Tensor:
            return m.velocity(x, torch.full((b,), t, device=x.device), mu, self.spk, cache=self._velocity_caches[j])

        return m.denormalize(integrate(m.source(self.noise[..., start:stop], mu, sampling=True), v, self.steps,
                                       self.solver))


def mel_statistics(mels: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and std of log-mels (80, T_i) over all their frames (for ``set_mel_stats``)."""
    total, square, count = np.zeros(N_MELS), np.zeros(N_MELS), 0
    for mel in mels:
        m = np.asarray(mel, dtype=np.float64)
        total += m.sum(1)
        square += (m**2).sum(1)
        count += m.shape[1]
    if count == 0:
        raise Token2MelError("no mel frames to compute statistics from")
    mean = total / count
    return mean.astype(np.float32), np.sqrt(np.maximum(square / count - mean**2, 1e-6)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Training batches and the loss for train.train_loop
# ---------------------------------------------------------------------------------------------
DEFAULT_CROP_FRAMES = 256  # 2.97 s of mel per training example


def _crop(n_units: int, n_mel: int, crop_frames: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(u0, u1, m0, m1): a random crop starting at a unit boundary, units [u0, u1), mel [m0, m1)."""
    if n_mel <= crop_frames:
        return 0, n_units, 0, n_mel
    # starts u with mel_frames_for_units(u) + crop_frames <= n_mel  <=>  u <= unit_index(n_mel - crop_frames)
    last = min(int(unit_index_of_mel_frame(n_mel - crop_frames)), n_units - 1)
    u0 = int(rng.integers(0, last + 1))
    m0 = mel_frames_for_units(u0)
    m1 = m0 + crop_frames
    u1 = min(n_units, int(unit_index_of_mel_frame(m1 - 1)) + 1)
    return u0, u1, m0, m1


def token2mel_batch(items: list[dict], crop_frames: int, rng: np.random.Generator) -> dict:
    """Collate items {units, pitch, energy (T_u,), mel (80, T_mel), spk_ref (160,)} into tensors.

    Each item longer than ``crop_frames`` mel frames is cropped at a random *unit boundary*
    u0: the mel crop starts at frame mel_frames_for_units(u0), the first frame of unit u0, and
    ``unit_index`` records which unit of the cropped units each cropped mel frame reads, so
    mel and tokens stay exactly aligned. Returns units/pitch/energy (B, U) long, mel (B, 80, T),
    mel_mask (B, T) bool, unit_index (B, T) long, spk_ref (B, 160): the keywords of
    ``Token2Mel.loss``.
    """
    if not items:
        raise Token2MelError("cannot collate an empty batch")
    rows = []
    for i, item in enumerate(items):
        units = np.asarray(item["units"], dtype=np.int64)
        pitch = np.asarray(item["pitch"], dtype=np.int64)
        energy = np.asarray(item["energy"], dtype=np.int64)
        mel = np.asarray(item["mel"], dtype=np.float32)
        if not (units.ndim == 1 and units.shape == pitch.shape == energy.shape and len(units) > 0):
            raise Token2MelError(f"item {i}: units, pitch, energy must be non-empty 1-D arrays of one length, got "
                                 f"{units.shape}, {pitch.shape}, {energy.shape}")
        if mel.ndim != 2 or mel.shape[0] != N_MELS or mel.shape[1] == 0:
            raise Token2MelError(f"item {i}: mel must be ({N_MELS}, T > 0), got {mel.shape}")
        u0, u1, m0, m1 = _crop(len(units), mel.shape[1], int(crop_frames), rng)
        index = mel_unit_index(m1 - m0, u1 - u0, u0)
        rows.append((units[u0:u1], pitch[u0:u1], energy[u0:u1], mel[:, m0:m1], index,
                     np.asarray(item["spk_ref"], dtype=np.float32)))
    b = len(rows)
    n_u, n_m = max(len(r[0]) for r in rows), max(r[3].shape[1] for r in rows)
    out = {"units": torch.zeros(b, n_u, dtype=torch.long), "pitch": torch.zeros(b, n_u, dtype=torch.long),
           "energy": torch.zeros(b, n_u, dtype=torch.long), "mel": torch.full((b, N_MELS, n_m), LOG_MEL_FLOOR),
           "mel_mask": torch.zeros(b, n_m, dtype=torch.bool), "unit_index": torch.zeros(b, n_m, dtype=torch.long),
           "spk_ref": torch.as_tensor(np.stack([r[5] for r in rows]))}
    for i, (units, pitch, energy, mel, index, _) in enumerate(rows):
        out["units"][i, : len(units)] = torch.from_numpy(units)
        out["pitch"][i, : len(units)] = torch.from_numpy(pitch)
        out["energy"][i, : len(units)] = torch.from_numpy(energy)
        out["mel"][i, :, : mel.shape[1]] = torch.from_numpy(mel)
        out["mel_mask"][i, : mel.shape[1]] = True
        out["unit_index"][i, : mel.shape[1]] = index
    return out


def _fingerprint(items: list[dict]) -> int:
    """A cheap content hash of a micro-batch, so micro-batches of one optimizer step get different crops."""
    crc = 0
    for item in items:
        crc = zlib.crc32(np.asarray(item["units"], dtype=np.int64)[:64].tobytes(), crc)
        crc = zlib.crc32(np.int64(np.asarray(item["mel"]).shape[-1]).tobytes(), crc)
    return crc


def loss_fn(model: Token2Mel, batch_items: list[dict], step: int | None = None,
            crop_frames: int = DEFAULT_CROP_FRAMES, seed: int = 0) -> dict:
    """The ``loss_fn`` of ``train.train_loop``: crop, collate, and return ``model.loss`` (dict with 'loss').

    Crops, flow times and noise come from np.random.default_rng([seed, step, batch hash]), so a
    resumed run replays them exactly. Change the crop with
    ``functools.partial(loss_fn, crop_frames=..., seed=...)`` (train_loop still sees ``step``).
    """
    rng = np.random.default_rng([int(seed), int(step or 0), _fingerprint(batch_items)])
    batch = token2mel_batch(batch_items, crop_frames, rng)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return model.loss(**batch, generator=generator)


@torch.no_grad()
def heldout_loss(model: Token2Mel, items: list[dict], crop_frames: int = DEFAULT_CROP_FRAMES, seed: int = 0,
                 batch_size: int = 8) -> dict[str, float]:
    """Mean loss terms over ``items`` with fixed crops and noise: an ``eval_fn`` for train_loop.

    Use it as ``eval_fn=lambda m: heldout_loss(m, val_items)``; numbers are comparable across steps.
    """
    sums: dict[str, float] = {}
    for k in range(0, len(items), batch_size):
        chunk = items[k : k + batch_size]
        rng = np.random.default_rng([int(seed), k])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        terms = model.loss(**token2mel_batch(chunk, crop_frames, rng), generator=generator)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value) * len(chunk)
    return {f"val_{name}": value / len(items) for name, value in sums.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def checkpoint_payload(model: Token2Mel, extra: dict | None = None) -> dict:
    """What ``train_loop``'s ``payload_fn`` should return: kind, config and state (+ extra)."""
    return {"kind": TOKEN2MEL_CHECKPOINT_KIND, "config": model.config.to_dict(), "state": model.trainable_state(),
            **(extra or {})}


def check_checkpoint(payload: dict, config: Token2MelConfig, path) -> None:
    """``check_resume`` for train_loop: refuse a checkpoint of another kind or configuration."""
    if payload.get("kind") != TOKEN2MEL_CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a token2mel checkpoint; delete it or pick another run name")
    saved, wanted = payload.get("config", {}), config.to_dict()
    changed = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v and k not in SAMPLING_ONLY}
    if changed:
        details = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items())
        raise CheckpointError(f"{path} was trained with another token2mel configuration ({details}); "
                              "delete it to train from scratch, or use the old settings")


def save_token2mel(path: str | Path, model: Token2Mel, history: dict | None = None) -> Path:
    """Save config + weights (+ optional training history) atomically."""
    return save_checkpoint(path, checkpoint_payload(model, {"history": history} if history is not None else None))


def load_token2mel(path: str | Path, device: str = "cpu", temperature: float | None = None) -> Token2Mel:
    """A ``Token2Mel`` from ``save_token2mel`` or from train_loop's ``latest.pt`` (eval mode).

    ``temperature`` (the preset's ``token2mel.temperature``) replaces the saved sampling
    temperature: it changes synthesis only, not the weights. A missing file names
    notebooks/05_tokens.ipynb, which makes it; a file of another kind or whose weights do not
    fit its config raises ``CheckpointError``.
    """
    payload = load_checkpoint(path, TOKENS_NOTEBOOK)
    if payload.get("kind") != TOKEN2MEL_CHECKPOINT_KIND or "config" not in payload or "state" not in payload:
        raise CheckpointError(f"{path} is not a token2mel checkpoint; run {TOKENS_NOTEBOOK} to make one.")
    try:
        values = dict(payload["config"])
        if temperature is not None:
            values["temperature"] = float(temperature)
        model = Token2Mel(Token2MelConfig.from_dict(values))
        model.load_trainable_state(payload["state"])
    except (Token2MelError, RuntimeError) as err:
        raise CheckpointError(f"{path}: {err}; run {TOKENS_NOTEBOOK} again.") from err
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Vocoders: HiFi-GAN (offline and streaming) and Griffin-Lim
# ---------------------------------------------------------------------------------------------
VOCODER_PRECISIONS = ("float32", "bfloat16", "auto")


def native_bfloat16(device="cpu") -> bool:
    """Does ``device`` compute in bfloat16 natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX)?

    Elsewhere bfloat16 is emulated and slower than float32, so ``precision="auto"`` keeps float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device) -> str:
    """``auto`` -> ``bfloat16`` where ``native_bfloat16(device)``, else ``float32``; other values unchanged."""
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return precision


class Vocoder:
    """A frozen HiFi-GAN generator behind a numpy interface, offline or chunk by chunk.

    ``precision``: ``float32``, ``bfloat16`` (autocast: the convolutions run in bfloat16, the
    output is float32) or ``auto`` (bfloat16 where the device computes it natively, see
    ``native_bfloat16``). ``self.precision`` is the one in use. On a CPU with AMX, streamed
    bfloat16 vocoding was 1.8x faster, but offline vocoding of utterances of many different
    lengths was slower, and the waveform moves by about 5 % relative RMS; docs/findings.md
    ("Benchmarks, as measured") has what Whisper and the emotion encoder make of it.

    How ``stream`` differs from offline vocoding: HiFi-GAN's convolutions look both ways; the
    packaged V1 generator's receptive field reaches about 10 mel frames (116 ms) to each side.
    So a chunk vocoded on its own is wrong (1) at its start, which misses the past, and (2) much
    more at its end, which sees zero padding where the next frames should be (measured on the
    packaged vocoder: the last ~10 frames of a chunk are off by about the signal's own RMS).
    ``stream`` therefore

    - vocodes each piece with ``context_frames`` frames of *left* context and drops their samples;
    - holds back the audio of the last ``right_context_frames`` frames received until that many
      later frames have arrived (added latency: right_context_frames x 11.6 ms); the last frames
      are released when the input ends;
    - optionally cross-fades (linearly, ``crossfade_samples`` <= left context) each piece's tail
      with the next call's re-computation of the same samples, which saw more future frames.

    With ``right_context_frames=0`` this is the plain "left context + trim" scheme, whose seams
    are audible (relative RMS error ~0.5 on a test tone, chunks of 20 frames); with the defaults
    (12 left, 12 right, 139 ms of added latency) the streamed audio matches offline vocoding to
    ~1e-4 relative RMS (unit test). The total length is always T * hop, as offline.
    """

    def __init__(self, generator: nn.Module, mel_cfg: MelConfig | None = None, context_frames: int = 12,
                 right_context_frames: int = 12, crossfade_samples: int = 0, precision: str = "float32"):
        self.mel_cfg = mel_cfg or MelConfig()
        check_vocoder_config(self.mel_cfg, generator)
        if context_frames < 0 or right_context_frames < 0 or not 0 <= crossfade_samples <= context_frames * self.mel_cfg.hop:
            raise ValueError(f"need context_frames >= 0, right_context_frames >= 0 and 0 <= crossfade_samples <= "
                             f"context_frames * hop ({context_frames * self.mel_cfg.hop}), got {context_frames}, "
                             f"{right_context_frames} and {crossfade_samples}")
        self.generator = generator.eval()
        self.context_frames = context_frames
        self.right_context_frames = right_context_frames
        self.crossfade_samples = crossfade_samples
        self.requested_precision = precision
        self.to(next(generator.parameters()).device)  # checks and resolves the precision

    @classmethod
    def from_source(cls, source: str = "packaged:hifigan-universal", **kwargs) -> "Vocoder":
        from .pretrained import load_vocoder

        return cls(load_vocoder(source), **kwargs)

    @classmethod
    def from_preset(cls, cfg: dict, device: str = "cpu") -> "Vocoder":
        """The preset's vocoder: ``models.vocoder``, ``token2mel.vocoder_context_frames`` (left and right)
        and ``synthesis.vocoder_precision``, on ``device``."""
        context = cfg["token2mel"]["vocoder_context_frames"]
        vocoder = cls.from_source(cfg["models"]["vocoder"], context_frames=context, right_context_frames=context)
        return vocoder.to(device, precision=cfg.get("synthesis", {}).get("vocoder_precision", "float32"))

    def to(self, device, precision: str | None = None) -> "Vocoder":
        """Move the generator to ``device`` (and resolve ``precision``, default: the one asked for before)."""
        self.generator.to(device)
        self.requested_precision = precision or self.requested_precision
        if self.requested_precision not in VOCODER_PRECISIONS:
            raise ValueError(f"vocoder precision must be one of {VOCODER_PRECISIONS}, got {self.requested_precision!r}")
        self.precision = resolve_precision(self.requested_precision, torch.device(device))
        return self

    def _mel(self, mel) -> torch.Tensor:
        mel = torch.as_tensor(np.asarray(mel) if not torch.is_tensor(mel) else mel, dtype=torch.float32)
        if mel.dim() not in (2, 3) or mel.shape[-2] != self.mel_cfg.n_mels:
            raise MelConfigError(f"the vocoder needs a log-mel of shape ({self.mel_cfg.n_mels}, T) or "
                                 f"(B, {self.mel_cfg.n_mels}, T), got {tuple(mel.shape)}")
        return mel

    @torch.no_grad()
    def __call__(self, mel) -> np.ndarray:
        """log-mel (80, T) -> wav (T * hop,), or (B, 80, T) -> (B, T * hop); float32 numpy."""
        mel = self._mel(mel)
        device = next(self.generator.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            wav = self.generator(mel.reshape(-1, *mel.shape[-2:]).to(device))
        wav = wav.float().cpu().numpy()
        return wav[0] if mel.dim() == 2 else wav

    def stream(self, mel_chunks: Iterable) -> Iterator[np.ndarray]:
        """Mel chunks (80, T_k) (or (1, 80, T_k)) in order -> audio pieces (float32), T * hop samples in all.

        A piece is yielded for every chunk that makes new frames ready (received minus the held
        back right context), and a last one when the input ends.
        """
        hop, left, cf = self.mel_cfg.hop, self.context_frames, self.crossfade_samples
        buf: torch.Tensor | None = None  # mel frames [buf_start, received)
        state = {"buf_start": 0, "received": 0, "emitted": 0}
        pending = np.zeros(0, dtype=np.float32)  # held-back tail samples awaiting the cross-fade

        def render(upto: int, final: bool) -> np.ndarray:
            nonlocal buf, pending
            wav = self(buf)
            a = (state["emitted"] - state["buf_start"]) * hop
            out = wav[a : (upto - state["buf_start"]) * hop]
            if len(pending):
                p = len(pending)
                fade = np.linspace(0.0, 1.0, p + 2, dtype=np.float32)[1:-1]  # weight of the newer estimate
                out = np.concatenate([pending * (1 - fade) + wav[a - p : a] * fade, out])
            keep = 0 if final else min(cf, len(out))
            out, pending = out[: len(out) - keep], out[len(out) - keep :]
            state["emitted"] = upto
            start = max(state["buf_start"], upto - left)  # keep only the left context of what is not yet out
            buf = buf[:, start - state["buf_start"] :]
            state["buf_start"] = start
            return out.astype(np.float32)

        for chunk in mel_chunks:
            chunk = self._mel(chunk)
            if chunk.dim() == 3:
                if chunk.shape[0] != 1:
                    raise MelConfigError(f"Vocoder.stream takes one utterance, got a batch of {chunk.shape[0]} chunks")
                chunk = chunk[0]
            if chunk.shape[-1] == 0:
                continue
            buf = chunk if buf is None else torch.cat([buf, chunk], dim=-1)
            state["received"] += chunk.shape[-1]
            ready = state["received"] - self.right_context_frames
            if ready > state["emitted"]:
                yield render(ready, final=False)
        if buf is not None and (state["received"] > state["emitted"] or len(pending)):
            yield render(state["received"], final=True)


def vocoder_blocks(mel_chunks: Iterable, block_frames: int) -> Iterator[torch.Tensor]:
    """Regroup streamed log-mel chunks (80, T_k) for ``Vocoder.stream``: the first alone, then >= ``block_frames``.

    Each call of ``Vocoder.stream`` re-vocodes its left and held-back right context (24 frames
    with the defaults) besides the new frames, so 24-frame chunks cost the vocoder about twice
    offline vocoding, while 48-frame blocks cost 1.5x. The first chunk still goes out alone, so
    the first audio is not delayed; later chunks wait until ``block_frames`` frames are there
    (the pipeline of notebook 07 groups them by the same rule, ``synthesis.vocoder_block_frames``).
    The last block holds whatever is left. The frames, in order, are exactly the input's.
    """
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    waiting: list[torch.Tensor] = []
    first = True
    for chunk in mel_chunks:
        chunk = torch.as_tensor(np.asarray(chunk) if not torch.is_tensor(chunk) else chunk, dtype=torch.float32)
        if chunk.shape[-1] == 0:
            continue
        waiting.append(chunk)
        if first or sum(int(c.shape[-1]) for c in waiting) >= block_frames:
            yield torch.cat(waiting, dim=-1)
            waiting, first = [], False
    if waiting:
        yield torch.cat(waiting, dim=-1)


@dataclass
class StreamedSpeech:
    """One utterance streamed by ``stream_speech``: what came out and how fast."""

    mel: torch.Tensor  # (80, T) the streamed mel chunks, concatenated
    audio: np.ndarray  # the streamed audio pieces, concatenated (22.05 kHz)
    chunks: int  # mel chunks token2mel emitted
    first_audio_s: float | None  # seconds from the start until the first audio sample was ready
    seconds: float  # wall time of the whole utterance

    @property
    def real_time_factor(self) -> float:
        """Compute time / audio time: below 1, the audio is produced faster than it plays."""
        return self.seconds / max(len(self.audio) / SAMPLE_RATE, 1e-9)


def stream_speech(token2mel: "Token2Mel", vocoder: Vocoder, units, pitch, energy, spk_ref,
                  noise: torch.Tensor | None = None, block_frames: int = 0) -> StreamedSpeech:
    """Stream one utterance's tokens through token2mel and the vocoder, and time it.

    token2mel emits mel chunks (``Token2Mel.stream``); with ``block_frames`` > 0 they reach the
    vocoder as ``vocoder_blocks`` groups them (the first chunk alone, then blocks of at least
    ``block_frames``), with 0 one by one. The clock starts before the first token2mel call, so
    ``first_audio_s`` is the latency a listener would wait. Call it once untimed first if the
    cost of a first call (allocation, kernel selection) should not count.
    """
    chunks: list[torch.Tensor] = []

    def remember(mel_chunks):
        for chunk in mel_chunks:
            chunks.append(chunk)
            yield chunk

    started = time.perf_counter()
    first, pieces = None, []
    with torch.inference_mode():
        mel_chunks = remember(c[0] for c in token2mel.stream(units, pitch, energy, spk_ref, noise=noise))
        for piece in vocoder.stream(vocoder_blocks(mel_chunks, block_frames) if block_frames > 0 else mel_chunks):
            if first is None and len(piece):
                first = time.perf_counter() - started
            pieces.append(piece)
    seconds = time.perf_counter() - started
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    return StreamedSpeech(torch.cat(chunks, dim=-1), audio, len(chunks), first, seconds)


def griffin_lim(mel, mel_cfg: MelConfig | None = None, n_iter: int = 32) -> np.ndarray:
    """A vocoder without training: log-mel (80, T) -> wav (T * hop,) float32.

    exp(mel) is the Slaney-mel magnitude M = F^T |S|; its least-squares inverse |S| ≈ pinv(F^T) M
    (clipped at 0) is a linear magnitude spectrogram, and Griffin-Lim (power = 1) iterates
    STFT/ISTFT to find a phase consistent with it. Deterministic (zero initial phase). Sounds
    buzzy: it is the baseline that shows what the neural vocoder adds.
    """
    import torchaudio.functional as AF
    import torchaudio.transforms as T

    cfg = mel_cfg or MelConfig()
    mel = torch.as_tensor(np.asarray(mel) if not torch.is_tensor(mel) else mel, dtype=torch.float32)
    if mel.dim() != 2 or mel.shape[0] != cfg.n_mels:
        raise MelConfigError(f"griffin_lim needs a log-mel of shape ({cfg.n_mels}, T), got {tuple(mel.shape)}")
    filters = AF.melscale_fbanks(cfg.n_fft // 2 + 1, cfg.fmin, cfg.fmax, cfg.n_mels, cfg.sr,
                                 norm="slaney", mel_scale="slaney")  # (n_freq, n_mels)
    magnitude = (torch.linalg.pinv(filters.T) @ mel.exp()).clamp(min=0.0)
    # torch's centred STFT of n = T * hop samples has T + 1 frames: repeat the last one
    magnitude = torch.cat([magnitude, magnitude[:, -1:]], dim=1)
    n = mel.shape[1] * cfg.hop
    gl = T.GriffinLim(n_fft=cfg.n_fft, n_iter=n_iter, win_length=cfg.win_size, hop_length=cfg.hop, power=1.0,
                      length=n, rand_init=False)
    return gl(magnitude).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Training items of a run: tokens + mel + a reference from ANOTHER utterance of the same voice
# ---------------------------------------------------------------------------------------------
def speaker_vectors(mels: dict, min_frames: int = 86) -> dict:
    """``speaker_reference`` of every (T_mel, 80) mel in ``mels`` that is long enough; short ones are left out."""
    out = {}
    for key, mel in mels.items():
        try:
            out[key] = speaker_reference(np.asarray(mel, dtype=np.float32).T, min_frames=min_frames).numpy()
        except SpeakerReferenceError:
            continue
    return out


def pick_references(keys: list[str], speakers: list[str], usable: set, seed: int = 0) -> dict:
    """For each utterance, another utterance of the same speaker to take the voice from.

    The reference is never the utterance itself: the model must copy the *voice* from the
    reference, not the target's emotion or words (CosyVoice takes the prompt from another
    utterance for the same reason). Seeded, so a run picks the same references every time.
    A speaker with a single usable utterance has no reference and is left out.
    """
    rng = np.random.default_rng(seed)
    pool: dict = {}
    for key, speaker in zip(keys, speakers):
        if key in usable:
            pool.setdefault(speaker, []).append(key)
    chosen = {}
    for key, speaker in zip(keys, speakers):
        others = [k for k in pool.get(speaker, []) if k != key]
        if others:
            chosen[key] = others[int(rng.integers(len(others)))]
    return chosen


def token2mel_items(keys: list[str], tokens: dict, mels: dict, references: dict, vectors: dict) -> list[dict]:
    """Items for ``token2mel_batch``: (unit, pitch, energy) frames, the (80, T) mel and the reference vector."""
    items = []
    for key in keys:
        if key not in references:
            continue
        frames = np.asarray(tokens[key], dtype=np.int64)
        items.append({"key": key, "units": frames[:, 0], "pitch": frames[:, 1], "energy": frames[:, 2],
                      "mel": np.asarray(mels[key], dtype=np.float32).T, "spk_ref": vectors[references[key]]})
    return items
