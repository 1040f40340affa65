"""Stage 2: the emotional speech decoder. LLM states + token embeddings + emotion -> speech tokens.

Stage 1 writes the reply one text token at a time and hands out, per token ``i``, three things:
the LLM's last hidden state ``h_i``, the token's own input embedding ``e_i`` and the emotion
head's vector ``emo_i``. Stage 2 turns that stream into the discrete speech tokens of
``speech_tokens`` (25 Hz content units plus pitch and energy tokens), which ``token2wav`` makes
audible. The paper's decoder, piece by piece::

    gate      g_i = sigmoid(W [h_i; e_i] + b)          x_i = g_i * h_i + (1 - g_i) * e_i
    AdaLN     AdaLN(x | emo) = LN(x) * (1 + scale(emo)) + shift(emo)
    blocks    6 pre-norm causal Transformer blocks, both norms AdaLN (DiT-style)
    heads     content unit, pitch bin, energy bin per 25 Hz frame

**The gate.** ``h_i`` knows the context (what the reply means so far); ``e_i`` knows exactly
which word this is (how it is pronounced). The gate chooses, per dimension and per token, how
much of each to pass on. Since ``g`` is in (0, 1), every output coordinate is a convex
combination of the two inputs: it lies between them.

**AdaLN.** A LayerNorm normally ends with a learned scale and shift. Adaptive LayerNorm
predicts them from a condition instead, here the emotion of the token being spoken, so one
network speaks the same words sadly or joyfully by re-scaling its features. The Linear that
predicts ``scale`` and ``shift`` starts at zero: at initialisation AdaLN *is* a plain
LayerNorm and the emotion's influence grows only as training finds it useful (the same trick as
DiT's adaLN-Zero, which also zero-initialises residual gates; the kit keeps just the norm).

**Durations make streaming simple.** Text tokens and speech frames run on different clocks.
The decoder first predicts how many 25 Hz frames each token lasts (``log(1 + frames)``, trained
against the DTW spans of notebook 03), then copies the token's vector onto that many frames
(plus a position inside the token) and runs the causal frame Transformer. Everything is causal:
token ``i``'s duration depends on tokens ``<= i`` (+ ``lookahead_tokens``), frame ``f`` on frames
``<= f``. So the frames of token ``i`` are final as soon as token ``i + lookahead`` has been
written, and ``stream`` hands them out then: no alignment search, no waiting for the sentence.

**Non-autoregressive in units.** No frame sees the *unit* chosen for an earlier frame; every
frame's unit is an independent argmax given the inputs. On a small corpus this is robust (no
exposure bias, no error snowballing, no stopping criterion), and windows for long replies are
trivial because a window's left context is made of inputs, never of earlier outputs.
LLaMA-Omni makes the same choice: it upsamples the LLM's hidden states non-autoregressively
and trains the units with CTC; here explicit durations replace CTC, which also gives the
streaming schedule above.

**The emotion schedule.** At training time the ground-truth (DTW) emotion trajectory is clean,
at test time stage 1's prediction is not. ``emotion_mix`` feeds
``(1 - alpha) * gt + alpha * pred``, with ``alpha`` rising from 0 (learn with clean emotions)
to ``end_alpha`` (learn to cope with the predicted ones) over training ("linear"), or fixed
(the public code's 30/70 mix is ``alpha = 0.7``).

**The voice.** The paper's speech tokens (CosyVoice 2's) carry no pitch, so its decoder needs
no speaker. The kit's tokens do: pitch tokens are absolute F0 bins, and the training replies
are spoken by eight voices, men and women, an octave apart. A decoder that does not know the
voice can only guess between a man's and a woman's pitch for every frame, and the emotion's
pitch movements drown in that guess. With ``speaker_dim > 0`` (preset ``stage2.speaker``) the
decoder also reads the reply voice's speaker reference (``token2wav.speaker_reference``, the
same 160 numbers token2mel reads): layer-normalised, passed through a small MLP and added to
every token vector, so the durations and the frames both know whose voice they plan for. In
training the reference is a neutral utterance of the reply's speaker (``pipeline.run_voices``),
at inference the reply voice's.

**Decoder variants.** ``SpeechDecoder`` (registry name ``"durations"``) is the kit's default.
``emo_lib.interleaved.InterleavedDecoder`` (``"interleaved"``) is the OpenS2S-style alternative:
it reads R hidden states, writes W units, autoregressively, and learns the alignment itself.
``build_decoder(name, cfg, ...)`` makes either from a preset; checkpoints record which one
(``"decoder"``), and ``load_decoder`` rebuilds the right class.

**Ablations.** ``fusion="hidden_only"`` drops the gate (``x = LN h``, the embedding is never
seen); ``adaln=False`` drops the emotion (plain LayerNorm). ``fusion="none"`` is the paper's
"without fusion" row in one switch: hidden state only *and* plain LayerNorm, whatever ``adaln``
says.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

STAGE2_NOTEBOOK = "06_stage2.ipynb"
STAGE2_CHECKPOINT_KIND = "stage2"
FUSIONS = ("gate", "hidden_only", "none")
DEFAULT_DECODER = "durations"
SPEAKER_DIM = 160  # token2wav.speaker_reference: mean and std of each of the 80 mel bins


class DecoderInputError(ValueError):
    """Inputs or targets the decoder cannot use (wrong width, ids outside a vocabulary, bad spans)."""


@dataclass
class DecoderConfigBase:
    """What the stage-2 decoder configs share: the widths and vocabularies, the fusion switches,
    their checks, the dict round trip.

    Subclasses are dataclasses that add their own fields and call ``check_shared`` from
    ``__post_init__`` with the names of the fields that must be >= 1.
    """

    hidden_dim: int = 576
    emotion_dim: int = 256
    dim: int = 256
    layers: int = 6
    heads: int = 4
    n_units: int = 512
    pitch_bins: int = 33
    energy_bins: int = 8
    max_frames: int = 1024
    dropout: float = 0.1
    prosody_weight: float = 1.0
    fusion: str = "gate"
    adaln: bool = True

    def check_shared(self, positive: tuple[str, ...]) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def use_adaln(self) -> bool:
        """Whether the norms are AdaLN (emotion-conditioned): ``adaln`` and not ``fusion="none"``."""
        return self.adaln and self.fusion != "none"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid: {sorted(known)}")
        return cls(**values)


@dataclass
class Stage2Config(DecoderConfigBase):
    """Everything that fixes the shapes of a stage-2 decoder; saved in its checkpoints.

    ``max_frames`` is the attention context in 25 Hz frames (1024 = 41 s); longer replies are
    decoded in windows. ``max_token_frames`` clips the within-token position and caps a
    predicted duration. ``fusion="hidden_only"`` (no gate, ``x = h``) and ``adaln=False``
    (plain LayerNorm, emotion ignored) are the ablation switches; ``fusion="none"`` is both at
    once (``use_adaln`` is then False whatever ``adaln`` says). ``speaker_dim`` > 0 adds the
    reply voice's speaker reference as an input (0: no voice input, the decoder guesses it).
    """

    lookahead_tokens: int = 1
    max_token_frames: int = 40
    duration_layers: int = 2
    duration_weight: float = 1.0
    speaker_dim: int = 0

    def __post_init__(self):
        self.check_shared(("n_units", "pitch_bins", "energy_bins", "layers", "hidden_dim", "emotion_dim"))
        if self.speaker_dim < 0:
            raise ValueError(f"speaker_dim must be >= 0 (0: no voice input), got {self.speaker_dim}")
        if self.lookahead_tokens < 0:
            raise ValueError(f"lookahead_tokens must be >= 0, got {self.lookahead_tokens}")
        if not 1 <= self.max_token_frames <= self.max_frames:
            raise ValueError(f"max_token_frames must be in [1, max_frames = {self.max_frames}], got {self.max_token_frames}")


# ---------------------------------------------------------------------------------------------
# Building blocks: the gate, AdaLN, a causal block
# ---------------------------------------------------------------------------------------------
class GatedFusion(nn.Module):
    """``g = sigmoid(W [h; e] + b)``, ``x = g * h + (1 - g) * e``; (..., width) x 2 -> (..., width).

    One gate value per dimension and per token: 1 passes the LLM's hidden state, 0 the token
    embedding. ``gate(h, e)`` returns ``g`` itself (for plots).
    """

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(2 * width, width)

    def gate(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(torch.cat([h, e], -1)))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        g = self.gate(h, e)
        return g * h + (1 - g) * e


class AdaLN(nn.Module):
    """Adaptive LayerNorm: ``LN(x) * (1 + scale(c)) + shift(c)``, ``scale, shift = Linear(c)``.

    The LayerNorm has no affine parameters of its own; the condition ``c`` (an emotion vector)
    supplies them. The Linear starts at zero, so at initialisation ``AdaLN(x, c) == LN(x)``
    for every ``c``. x (..., dim), c (..., emotion_dim) with the same leading shape.
    """

    def __init__(self, dim: int, emotion_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.to_scale_shift = nn.Linear(emotion_dim, 2 * dim)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(cond).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class PlainNorm(nn.LayerNorm):
    """An ordinary LayerNorm that accepts (and ignores) a condition: the ``adaln=False`` ablation."""

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def make_norm(dim: int, emotion_dim: int, adaln: bool) -> nn.Module:
    return AdaLN(dim, emotion_dim) if adaln else PlainNorm(dim)


class DecoderBlock(nn.Module):
    """Pre-norm causal Transformer block with AdaLN norms (DiT-style)::

        x = x + Attn(AdaLN1(x | c))      causal: position t attends to positions <= t
        x = x + MLP(AdaLN2(x | c))

    ``forward(x (B,T,dim), cond (B,T,E), past=None) -> (x, (k, v))``. ``past`` holds the keys
    and values of earlier positions (B, heads, T_past, dim/heads): the new positions attend to
    all of them and causally among themselves; the returned ``(k, v)`` include them, so feeding
    frames in pieces with the cache gives the same result as one call on the whole sequence.
    """

    def __init__(self, dim: int, heads: int, emotion_dim: int, adaln: bool = True, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = make_norm(dim, emotion_dim, adaln)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = make_norm(dim, emotion_dim, adaln)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, past: tuple | None = None):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x, cond)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        n_past = k.shape[2] - t
        if n_past == 0:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new query j sits at position n_past + j: it may see keys 0 .. n_past + j
            allowed = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=n_past)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.drop(self.out(att.transpose(1, 2).reshape(b, t, d)))
        x = x + self.drop(self.mlp(self.norm2(x, cond)))
        return x, (k, v)


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sine/cosine position codes: (...,) integer positions -> (..., dim); no length limit."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / max(1, half))
    angles = positions.float()[..., None] * freqs
    codes = torch.cat([angles.sin(), angles.cos()], -1)
    return F.pad(codes, (0, dim - 2 * half))


class DurationPredictor(nn.Module):
    """Token vectors -> ``log(1 + frames)`` per token: a small causal Transformer with AdaLN.

    Token ``i`` sees token vectors ``<= i`` (each of which already includes the next
    ``lookahead_tokens`` tokens) and its own emotion: anger speeds speech up, sadness slows it.
    """

    def __init__(self, config: Stage2Config):
        super().__init__()
        c = config
        self.blocks = nn.ModuleList(DecoderBlock(c.dim, c.heads, c.emotion_dim, c.use_adaln, c.dropout)
                                    for _ in range(c.duration_layers))
        self.norm = make_norm(c.dim, c.emotion_dim, c.use_adaln)
        self.out = nn.Linear(c.dim, 1)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = tokens + sinusoidal_positions(torch.arange(n, device=tokens.device), tokens.shape[-1])
        for block in self.blocks:
            x, _ = block(x, cond)
        return self.out(self.norm(x, cond)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Long replies: windows of at most max_frames frames
# ---------------------------------------------------------------------------------------------
class WindowPlanner:
    """Splits a reply into decoding windows of at most ``max_frames`` frames, one token at a time.

    A window is ``(context_start, first, end)``: tokens ``[first, end)`` are emitted, tokens
    ``[context_start, first)`` are re-decoded before them as left context (their frames are
    thrown away). When token ``i`` does not fit in the current window, a new one starts at
    ``i`` with up to ``context_frames`` frames of the tokens just before it as context. Frame
    positions restart at 0 in each window (the model never sees positions it was not trained
    on). The decision for token ``i`` uses durations ``<= i`` only, so ``stream`` makes the same
    windows as ``generate``. ``push(d)`` returns True when token ``i`` opened a new window.
    """

    def __init__(self, max_frames: int, context_frames: int | None = None):
        self.max_frames = max_frames
        self.context_frames = max_frames // 2 if context_frames is None else context_frames
        self.durations: list[int] = []
        self.closed: list[tuple[int, int, int]] = []
        self.context_start = self.first = self.frames = 0

    def push(self, duration: int) -> bool:
        i = len(self.durations)
        if not 0 <= duration <= self.max_frames:
            raise DecoderInputError(f"token {i} lasts {duration} frames; a duration must be in [0, max_frames = "
                                    f"{self.max_frames}]")
        opened = False
        if self.frames + duration > self.max_frames:
            self.closed.append((self.context_start, self.first, i))
            budget = min(self.context_frames, self.max_frames - duration)
            start, frames = i, 0
            while start > 0 and frames + self.durations[start - 1] <= budget:
                start -= 1
                frames += self.durations[start]
            self.context_start, self.first, self.frames = start, i, frames
            opened = True
        self.durations.append(int(duration))
        self.frames += int(duration)
        return opened

    def windows(self) -> list[tuple[int, int, int]]:
        return self.closed + [(self.context_start, self.first, len(self.durations))]


# ---------------------------------------------------------------------------------------------
# The decoder registry, preset helpers and what every stage-2 decoder shares
# ---------------------------------------------------------------------------------------------
DECODERS: dict[str, type] = {}


def register_decoder(name: str):
    """Class decorator: ``build_decoder(name, ...)`` and ``load_decoder`` can then make the class.

    Sets the class attribute ``registry_name`` (written into checkpoints as ``"decoder"``). A
    class must offer ``config_class`` (with ``to_dict``/``from_dict``) and the classmethod
    ``config_from_preset(cfg, hidden_dim, emotion_dim, kmeans_meta)``. Re-registering a name
    with a class of the same module and name (a reloaded module) replaces it; another class raises.
    """

    def add(cls: type) -> type:
        old = DECODERS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"a stage-2 decoder named {name!r} is already registered ({old.__qualname__}); "
                             "choose another name")
        cls.registry_name = name
        DECODERS[name] = cls
        return cls

    return add


def _load_builtin_decoders() -> None:
    """Import the modules that register the built-in decoders (``interleaved`` imports this
    module, so it cannot be imported at the top)."""
    from . import interleaved  # noqa: F401


def decoder_names() -> list[str]:
    """The registered decoder names, built-ins included: the valid values of ``stage2.decoder``."""
    _load_builtin_decoders()
    return sorted(DECODERS)


def decoder_class(name: str) -> type:
    """The decoder class registered as ``name``; an unknown name raises ``ValueError`` listing the names."""
    names = decoder_names()
    if name not in DECODERS:
        raise ValueError(f"unknown stage-2 decoder {name!r}; stage2.decoder must be one of {names}")
    return DECODERS[name]


def preset_values(cfg: dict, keys: Iterable[str], kmeans_meta: dict | None = None) -> dict:
    """``cfg["stage2"][k]`` for ``keys`` plus ``n_units``/``pitch_bins``/``energy_bins`` of ``kmeans_meta``.

    Missing keys raise a ``ValueError`` that names them and where they come from.
    """
    s2 = cfg.get("stage2")
    if not isinstance(s2, dict):
        raise ValueError("the preset has no stage2 section; load it with emo_lib.presets (see presets.yaml)")
    missing = [k for k in keys if k not in s2]
    if missing:
        raise ValueError(f"the preset's stage2 section lacks {missing}; add them to emo_lib/presets.yaml "
                         "(the base preset lists every stage-2 key)")
    values = {k: s2[k] for k in keys}
    if kmeans_meta is not None:
        lacking = [k for k in ("n_units", "pitch_bins", "energy_bins") if k not in kmeans_meta]
        if lacking:
            raise ValueError(f"kmeans_meta lacks {lacking}: pass the meta of tokens/tokens.npy (notebook 05)")
        values.update({k: int(kmeans_meta[k]) for k in ("n_units", "pitch_bins", "energy_bins")})
    return values


def config_from_preset(cfg: dict, hidden_dim: int, emotion_dim: int, kmeans_meta: dict) -> Stage2Config:
    """``SpeechDecoder``'s config from a preset: ``cfg["stage2"]``'s ``dim``, ``layers``, ``heads``,
    ``max_frames``, ``lookahead_tokens``, ``fusion``, ``adaln``, ``speaker`` (true: ``speaker_dim`` =
    the 160 numbers of ``token2wav.speaker_reference``); the vocabularies from
    ``kmeans_meta`` (``tokens/tokens.npy``'s meta); the widths from stage 1's states."""
    values = preset_values(cfg, ("dim", "layers", "heads", "max_frames", "lookahead_tokens", "fusion", "adaln",
                                 "speaker"), kmeans_meta)
    speaker_dim = SPEAKER_DIM if values.pop("speaker") else 0
    return Stage2Config(hidden_dim=int(hidden_dim), emotion_dim=int(emotion_dim), speaker_dim=speaker_dim, **values)


def build_decoder(name: str, cfg: dict, hidden_dim: int, emotion_dim: int, kmeans_meta: dict) -> nn.Module:
    """A fresh decoder ``name`` (``"durations"``, ``"interleaved"``, ...) sized by the preset ``cfg``.

    ``hidden_dim``/``emotion_dim``: the widths of stage 1's states; ``kmeans_meta``: the speech
    tokens' vocabularies (``n_units``, ``pitch_bins``, ``energy_bins``). Seed torch first.
    """
    cls = decoder_class(name)
    return cls(cls.config_from_preset(cfg, hidden_dim, emotion_dim, kmeans_meta))


PITCH_DECODINGS = ("voicing_first", "argmax")


def pick_pitch(logits: torch.Tensor, rule: str = "voicing_first") -> torch.Tensor:
    """(F, pitch_bins) logits -> (F,) pitch ids; id 0 is "unvoiced", ids 1.. are F0 bins.

    ``argmax`` takes the single most likely id. That is biased against voicing: when the decoder
    is unsure *which* F0 bin a voiced frame has, the voiced probability is spread over several
    neighbouring bins while "unvoiced" is one id, so "unvoiced" can win with, say, 0.3 against a
    voiced total of 0.7. On the cpu preset's validation replies argmax left 35 % of frames voiced
    against 53 % in the recordings, and the spoken replies came out breathy (docs/findings.md, notebooks 05-07).
    ``voicing_first`` decides the two questions in order: voiced when P(voiced) = 1 - P(id 0)
    >= 0.5, and then the most likely F0 bin among the voiced ones.
    """
    if rule not in PITCH_DECODINGS:
        raise ValueError(f"pitch decoding must be one of {list(PITCH_DECODINGS)}, got {rule!r} (synthesis.pitch_decoding)")
    if rule == "argmax" or logits.shape[0] == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float(), dim=-1)
    voiced = probs[:, 0] <= 0.5
    return torch.where(voiced, 1 + logits[:, 1:].argmax(-1), torch.zeros_like(voiced, dtype=torch.long))


class DecoderBase(nn.Module):
    """What the stage-2 decoders share: emotion statistics, one reply's inputs, state for checkpoints.

    A subclass sets ``config_class``, calls ``_register_emotion_stats(emotion_dim)`` in its
    ``__init__`` and implements ``config_from_preset``, ``loss``, ``generate`` and
    ``first_unit_after_tokens``. ``predicts_durations`` says whether ``predict_durations`` and
    the ``duration_mse`` term mean anything (``evaluate_stage2`` reports NaN when not).
    """

    registry_name = "unregistered"
    config_class: type = Stage2Config
    predicts_durations = True

    def _register_emotion_stats(self, emotion_dim: int) -> None:
        self.register_buffer("emotion_mean", torch.zeros(emotion_dim))
        self.register_buffer("emotion_std", torch.ones(emotion_dim))
        self.emotion_strength = 1.0  # inference knob (synthesis.emotion_strength), never saved; see emotion_condition
        self.pitch_decoding = "voicing_first"  # inference knob (synthesis.pitch_decoding), never saved; see pick_pitch

    @classmethod
    def config_from_preset(cls, cfg: dict, hidden_dim: int, emotion_dim: int, kmeans_meta: dict):
        raise NotImplementedError(f"{cls.__name__} does not say how a preset configures it")

    @property
    def first_unit_after_tokens(self) -> int:
        """How many reply tokens must have arrived before the first speech unit can be produced."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.emotion_mean.device

    def set_emotion_stats(self, vectors: np.ndarray) -> None:
        """Per-dimension mean and std (floor 1e-3) of training emotion vectors (N_total, E)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        self.emotion_mean.copy_(torch.as_tensor(vectors.mean(0)))
        self.emotion_std.copy_(torch.as_tensor(np.maximum(vectors.std(0), 1e-3)))

    def emotion_condition(self, emotion: torch.Tensor) -> torch.Tensor:
        """Standardised emotion vectors (training-set statistics): what conditions the AdaLNs.

        ``emotion_strength`` s scales them at inference: z = s (e - mean) / std, i.e. the plan
        is moved s times as far from the training set's average plan (s = 1: the plan as is;
        s > 1: an exaggerated emotion; s = 0: the average plan, no emotion). Training keeps s = 1.
        """
        z = (emotion - self.emotion_mean) / self.emotion_std
        return z if self.training else z * float(self.emotion_strength)

    def _reply_inputs(self, hidden, embeds, emotion) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One reply's (N,H), (N,H), (N,E) as float tensors on the model's device, widths checked."""
        c = self.config
        out = []
        for name, value, width in (("hidden", hidden, c.hidden_dim), ("embeds", embeds, c.hidden_dim),
                                   ("emotion", emotion, c.emotion_dim)):
            t = torch.as_tensor(np.asarray(value, dtype=np.float32) if isinstance(value, np.ndarray) else value)
            t = t.to(self.device, torch.float32)
            if t.dim() != 2 or t.shape[1] != width:
                raise DecoderInputError(f"{name} must have shape (N, {width}) for one reply, got {tuple(t.shape)}")
            out.append(t)
        if not out[0].shape[0] == out[1].shape[0] == out[2].shape[0]:
            raise DecoderInputError(f"hidden, embeds and emotion must have one row per token, got "
                                    f"{out[0].shape[0]}, {out[1].shape[0]}, {out[2].shape[0]}")
        return out[0], out[1], out[2]

    # -- parameters and state -------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """One group, ``decoder``, for ``train.train_loop`` (give it ``cfg['lr']['decoder']``)."""
        return {"decoder": [p for p in self.parameters() if p.requires_grad]}

    def trainable_state(self) -> dict:
        """Every weight and the emotion statistics (CPU copies): what a checkpoint must hold."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}

    def load_trainable_state(self, state: dict) -> None:
        try:
            self.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"this checkpoint does not fit the decoder's config ({err})") from err


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------
@register_decoder("durations")
class SpeechDecoder(DecoderBase):
    """Stage-2 decoder: per-token (h, e, emotion) -> durations -> per-frame unit, pitch, energy.

    Token level: ``h`` and ``e`` are layer-normalised separately (the LLM's last hidden states
    and its input embeddings live on very different scales; the gate can only choose between
    comparable vectors), fused by the gate, projected to ``dim``; the fused vectors of the next
    ``lookahead_tokens`` tokens are projected and added (zeros past the end of the reply). The
    look-ahead uses the *fused* vectors, not raw embeddings, so that the ``hidden_only`` and
    ``none`` ablations never see an embedding. Emotion vectors are standardised with training-set
    statistics (``set_emotion_stats``) before they condition any AdaLN.

    Frame level: frame ``f`` of token ``i`` gets token ``i``'s vector + an embedding of its
    index inside the token + an embedding of the token's length (both clipped to
    ``max_token_frames``; the length is known when the frames are produced, and tells a short
    token from a long one) + a sinusoidal frame position, then ``layers`` causal AdaLN blocks
    conditioned on emotion ``i`` and three heads. With ``fusion="none"`` or ``adaln=False``
    every norm is a plain LayerNorm and the emotion is ignored.
    """

    def __init__(self, config: Stage2Config):
        super().__init__()
        c = self.config = config
        self.hidden_norm = nn.LayerNorm(c.hidden_dim)
        self.embed_norm = nn.LayerNorm(c.hidden_dim) if c.fusion == "gate" else None
        self.fusion = GatedFusion(c.hidden_dim) if c.fusion == "gate" else None
        self.token_proj = nn.Linear(c.hidden_dim, c.dim)
        self.lookahead_proj = nn.ModuleList(nn.Linear(c.hidden_dim, c.dim) for _ in range(c.lookahead_tokens))
        self.duration_predictor = DurationPredictor(c)
        self.within_embedding = nn.Embedding(c.max_token_frames, c.dim)
        self.length_embedding = nn.Embedding(c.max_token_frames + 1, c.dim)
        self.blocks = nn.ModuleList(DecoderBlock(c.dim, c.heads, c.emotion_dim, c.use_adaln, c.dropout)
                                    for _ in range(c.layers))
        self.final_norm = make_norm(c.dim, c.emotion_dim, c.use_adaln)
        self.unit_head = nn.Linear(c.dim, c.n_units)
        self.pitch_head = nn.Linear(c.dim, c.pitch_bins)
        self.energy_head = nn.Linear(c.dim, c.energy_bins)
        self.speaker_proj = (nn.Sequential(nn.LayerNorm(c.speaker_dim), nn.Linear(c.speaker_dim, c.dim), nn.SiLU(),
                                           nn.Linear(c.dim, c.dim)) if c.speaker_dim else None)
        self._register_emotion_stats(c.emotion_dim)

    @classmethod
    def config_from_preset(cls, cfg: dict, hidden_dim: int, emotion_dim: int, kmeans_meta: dict) -> Stage2Config:
        return config_from_preset(cfg, hidden_dim, emotion_dim, kmeans_meta)

    def speaker_input(self, speaker, batch: int) -> torch.Tensor | None:
        """The voice reference as (batch, speaker_dim) on the model's device; None for a decoder without one.

        ``speaker``: (S,) for every row, or (batch, S). A decoder with ``speaker_dim > 0`` refuses
        ``None``: it was trained to plan pitch for a given voice.
        """
        s = self.config.speaker_dim
        if not s:
            return None
        if speaker is None:
            raise DecoderInputError(
                f"this decoder plans pitch for a given voice (speaker_dim = {s}, preset stage2.speaker): pass "
                "speaker=, the reply voice's reference (token2wav.speaker_reference, pipeline.run_voice)")
        v = torch.as_tensor(np.asarray(speaker, dtype=np.float32) if not torch.is_tensor(speaker) else speaker)
        v = v.to(self.device, torch.float32)
        if v.dim() == 1:
            v = v[None].expand(batch, -1)
        if v.shape != (batch, s):
            raise DecoderInputError(f"speaker must have shape ({s},) or ({batch}, {s}), got {tuple(v.shape)}")
        return v

    @property
    def first_unit_after_tokens(self) -> int:
        """Token ``i``'s frames need token ``i + lookahead_tokens``: the first after ``1 + lookahead_tokens``."""
        return 1 + self.config.lookahead_tokens

    # -- token level ----------------------------------------------------------------------------
    def fused(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The per-token vector before projection: gate(LN h, LN e), or LN h for ``hidden_only``."""
        h = self.hidden_norm(hidden)
        if self.fusion is None:
            return h
        return self.fusion(h, self.embed_norm(embeds))

    def token_vectors(self, hidden: torch.Tensor, embeds: torch.Tensor, token_mask: torch.Tensor,
                      speaker=None) -> torch.Tensor:
        """(B, N, H) x 2 + (B, N) mask (+ the voice, see ``speaker_input``) -> (B, N, dim):
        fused token + look-ahead tokens + the voice's vector."""
        x = self.fused(hidden, embeds) * token_mask[..., None]
        out = self.token_proj(x)
        n = x.shape[1]
        for k, proj in enumerate(self.lookahead_proj, start=1):
            ahead = torch.zeros_like(x)  # row i holds token i+k; zeros past the end of the reply
            ahead[:, : max(0, n - k)] = x[:, k:]
            out = out + proj(ahead)
        voice = self.speaker_input(speaker, x.shape[0])
        if voice is not None:
            out = out + self.speaker_proj(voice)[:, None, :]
        return out * token_mask[..., None]

    def frames_from_log(self, log_durations: torch.Tensor) -> torch.Tensor:
        """Predicted ``log(1 + frames)`` -> whole frames in [0, max_token_frames]."""
        return torch.round(torch.expm1(log_durations.float())).clamp(0, self.config.max_token_frames).long()

    # -- frame level ----------------------------------------------------------------------------
    def frame_inputs(self, tokens: torch.Tensor, cond: torch.Tensor, durations: torch.Tensor,
                     first_position: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upsample tokens to frames: (B,N,dim), (B,N,E), (B,N) -> x (B,F,dim), cond (B,F,E), mask (B,F).

        Token ``i`` is copied onto ``durations[i]`` frames; F is the longest row's total.
        """
        b, n = durations.shape
        total = durations.sum(1)
        frames = int(total.max()) if b and n else 0
        owner = torch.zeros(b, frames, dtype=torch.long, device=durations.device)
        within = torch.zeros(b, frames, dtype=torch.long, device=durations.device)
        mask = torch.zeros(b, frames, dtype=torch.bool, device=durations.device)
        for row in range(b):
            idx = torch.repeat_interleave(torch.arange(n, device=durations.device), durations[row])
            starts = torch.cumsum(durations[row], 0) - durations[row]
            owner[row, : len(idx)] = idx
            within[row, : len(idx)] = torch.arange(len(idx), device=durations.device) - starts[idx]
            mask[row, : len(idx)] = True
        t = self.config.max_token_frames
        length = torch.gather(durations, 1, owner).clamp(max=t) if n else owner
        x = torch.gather(tokens, 1, owner[..., None].expand(-1, -1, tokens.shape[-1]))
        x = x + self.within_embedding(within.clamp(max=t - 1)) + self.length_embedding(length)
        x = x + sinusoidal_positions(torch.arange(frames, device=x.device) + first_position, x.shape[-1])
        c = torch.gather(cond, 1, owner[..., None].expand(-1, -1, cond.shape[-1]))
        return x, c, mask

    def decode_frames(self, x: torch.Tensor, cond: torch.Tensor, past: list | None = None) -> tuple[dict, list]:
        """Causal frame blocks + heads: logits of units, pitch and energy and the new KV cache."""
        cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cond, None if past is None else past[i])
            cache.append(kv)
        y = self.final_norm(x, cond)
        return {"unit_logits": self.unit_head(y), "pitch_logits": self.pitch_head(y),
                "energy_logits": self.energy_head(y)}, cache

    # -- training -------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor, emotion: torch.Tensor, token_mask: torch.Tensor,
                durations: torch.Tensor, speaker=None) -> dict:
        """Teacher-forced pass with given durations (B, N) int -> logits over frames and log-durations.

        ``speaker``: the reply voices (B, speaker_dim), for a decoder with a voice input.

        Returns ``unit_logits`` (B,F,n_units), ``pitch_logits``, ``energy_logits``,
        ``log_durations`` (B,N) and ``frame_mask`` (B,F). A row longer than ``max_frames``
        raises: training examples must fit one window (``generate`` handles longer replies).
        """
        token_mask = token_mask.bool()
        durations = durations.long() * token_mask
        if bool((durations < 0).any()):
            raise DecoderInputError(f"durations must be >= 0, got a minimum of {int(durations.min())}")
        longest = int(durations.sum(1).max()) if durations.numel() else 0
        if longest > self.config.max_frames:
            raise DecoderInputError(f"a reply of {longest} unit frames is longer than max_frames = "
                                    f"{self.config.max_frames}; leave such examples out of training or raise max_frames")
        cond = self.emotion_condition(emotion) * token_mask[..., None]
        tokens = self.token_vectors(hidden, embeds, token_mask, speaker)
        log_durations = self.duration_predictor(tokens, cond)
        x, c, frame_mask = self.frame_inputs(tokens, cond, durations)
        logits, _ = self.decode_frames(x, c)
        return {**logits, "log_durations": log_durations, "frame_mask": frame_mask}

    def loss(self, batch: dict) -> dict:
        """``CE_unit + prosody_weight (CE_pitch + CE_energy) + duration_weight MSE_dur`` and accuracies.

        ``batch``: ``hidden``, ``embeds`` (B,N,H), ``emotion`` (B,N,E), ``token_mask`` (B,N),
        ``durations`` (B,N), ``units``/``pitch``/``energy`` (B,F) and ``frame_mask`` (B,F), as
        made by ``stage2_batch`` + ``mix_emotion``, and ``speaker`` (B,S) for a decoder with a voice
        input. The duration MSE is on ``log(1 + frames)``.
        """
        c = self.config
        frame_mask = batch["frame_mask"].bool()
        token_mask = batch["token_mask"].bool()
        durations = batch["durations"].long() * token_mask
        if not torch.equal(frame_mask.sum(1), durations.sum(1)):
            raise DecoderInputError(f"frames per row {frame_mask.sum(1).tolist()} differ from the summed durations "
                                    f"{durations.sum(1).tolist()}")
        targets = {}
        for name, size in (("units", c.n_units), ("pitch", c.pitch_bins), ("energy", c.energy_bins)):
            targets[name] = batch[name].long()
            check_ids(targets[name][frame_mask], size, name)
        out = self(batch["hidden"], batch["embeds"], batch["emotion"], token_mask, durations, batch.get("speaker"))
        f = out["frame_mask"].shape[1]
        valid = frame_mask[:, :f]
        terms = {}
        for name, key in (("unit", "units"), ("pitch", "pitch"), ("energy", "energy")):
            logits = out[f"{name}_logits"][valid].float()
            target = targets[key][:, :f][valid]
            terms[f"{name}_ce"] = F.cross_entropy(logits, target)
            terms[f"{name}_accuracy"] = (logits.argmax(-1) == target).float().mean().detach()
        log_target = torch.log1p(durations.float())
        m = token_mask.float()
        terms["duration_mse"] = (((out["log_durations"].float() - log_target) ** 2) * m).sum() / m.sum().clamp_min(1)
        loss = terms["unit_ce"] + c.prosody_weight * (terms["pitch_ce"] + terms["energy_ce"]) \
            + c.duration_weight * terms["duration_mse"]
        return {"loss": loss, **terms}

    @torch.no_grad()
    def predict_durations(self, hidden: torch.Tensor, embeds: torch.Tensor, emotion: torch.Tensor,
                          token_mask: torch.Tensor | None = None, speaker=None) -> torch.Tensor:
        """(B,N,H), (B,N,H), (B,N,E) (+ voices) -> predicted frames per token (B,N) long (0 at padding)."""
        if token_mask is None:
            token_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        token_mask = token_mask.bool()
        cond = self.emotion_condition(emotion) * token_mask[..., None]
        tokens = self.token_vectors(hidden, embeds, token_mask, speaker)
        return self.frames_from_log(self.duration_predictor(tokens, cond)) * token_mask

    # -- inference ------------------------------------------------------------------------------
    def _empty(self) -> dict:
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        return {"units": empty, "pitch": empty.clone(), "energy": empty.clone(), "durations": empty.clone(),
                "windows": []}

    def _choose_tokens(self, logits: dict, skip: int = 0) -> dict:
        """Each frame's unit and energy token (argmax) and pitch token (``pick_pitch``)."""
        out = {k: logits[f"{n}_logits"][0, skip:].argmax(-1) for k, n in (("units", "unit"), ("energy", "energy"))}
        return {**out, "pitch": pick_pitch(logits["pitch_logits"][0, skip:], self.pitch_decoding)}

    @torch.no_grad()
    def generate(self, hidden, embeds, emotion, durations=None, speaker=None) -> dict:
        """One reply (N,H), (N,H), (N,E) -> greedy ``units``, ``pitch``, ``energy`` (F,) and ``durations`` (N,).

        ``speaker``: the reply voice's (speaker_dim,) reference, for a decoder with a voice input.

        ``durations`` (N,) may be given (e.g. the DTW ones, to isolate the frame decoder); else
        they are predicted. Replies longer than ``max_frames`` are decoded in the windows of
        ``WindowPlanner`` (listed in ``windows``): every frame of every token is returned,
        ``len(units) == durations.sum()``. An empty reply (N = 0) gives empty outputs. Call
        ``model.eval()`` first (dropout).
        """
        h, e, emo = self._reply_inputs(hidden, embeds, emotion)
        n = h.shape[0]
        if n == 0:
            return self._empty()
        mask = torch.ones(1, n, dtype=torch.bool, device=self.device)
        tokens = self.token_vectors(h[None], e[None], mask, speaker)
        cond = self.emotion_condition(emo[None])
        if durations is None:
            durations = self.frames_from_log(self.duration_predictor(tokens, cond))[0]
        else:
            durations = torch.as_tensor(np.asarray(durations) if not torch.is_tensor(durations) else durations)
            durations = durations.to(self.device, torch.long)
            if durations.shape != (n,):
                raise DecoderInputError(f"durations must have shape ({n},), got {tuple(durations.shape)}")
        planner = WindowPlanner(self.config.max_frames)
        for d in durations.tolist():
            planner.push(d)
        pieces = []
        for start, first, end in planner.windows():
            if int(durations[first:end].sum()) == 0:
                continue
            x, c, _ = self.frame_inputs(tokens[:, start:end], cond[:, start:end], durations[None, start:end])
            logits, _ = self.decode_frames(x, c)
            pieces.append(self._choose_tokens(logits, skip=int(durations[start:first].sum())))
        result = {k: torch.cat([p[k] for p in pieces]) if pieces else self._empty()[k] for k in ("units", "pitch", "energy")}
        return {**result, "durations": durations, "windows": planner.windows()}

    @torch.no_grad()
    def stream(self, token_iter: Iterable, speaker=None) -> Iterator[dict]:
        """Consume ``(h_i, e_i, emo_i)`` one token at a time; yield each token's frames once known.

        ``speaker``: the reply voice's reference, as for ``generate``.

        Token ``i`` is ready when token ``i + lookahead_tokens`` has arrived (or the input has
        ended). Its duration comes from the causal duration predictor, its frames from the frame
        blocks with a KV cache of the current window (a new window re-decodes its left context
        once). Yields ``{"token": i, "duration": d, "units", "pitch", "energy"}`` ((d,) each, d may
        be 0); the concatenation equals ``generate`` on the whole reply.
        """
        lookahead = self.config.lookahead_tokens
        voice = self.speaker_input(speaker, 1)  # checked before the first token
        hs, es, emos = [], [], []
        tokens_final, conds, durations = [], [], []
        planner = WindowPlanner(self.config.max_frames)
        state = {"past": None}

        def ready(i: int) -> dict:
            h, e, emo = torch.stack(hs), torch.stack(es), torch.stack(emos)
            mask = torch.ones(1, len(hs), dtype=torch.bool, device=self.device)
            tokens = self.token_vectors(h[None], e[None], mask, voice)  # final for tokens <= i
            cond = self.emotion_condition(emo[None])
            tokens_final.append(tokens[:, i])
            conds.append(cond[:, i])
            log_d = self.duration_predictor(torch.stack(tokens_final, 1), torch.stack(conds, 1))[:, -1]
            d = int(self.frames_from_log(log_d)[0])
            durations.append(d)
            opened = planner.push(d)
            item = {"token": i, "duration": d}
            if opened or state["past"] is None:  # (re)start the window: decode its context + token i
                start = planner.context_start
                first_position = 0
                state["past"] = None
            else:  # continue the window: token i's frames only, with the cache
                start = i
                first_position = sum(durations[planner.context_start:i])
            span = torch.tensor(durations[start : i + 1], device=self.device)[None]
            if d == 0:
                empty = torch.zeros(0, dtype=torch.long, device=self.device)
                return {**item, "units": empty, "pitch": empty.clone(), "energy": empty.clone()}
            x, c, _ = self.frame_inputs(torch.stack(tokens_final[start:], 1), torch.stack(conds[start:], 1), span,
                                        first_position)
            logits, state["past"] = self.decode_frames(x, c, state["past"])
            return {**item, **self._choose_tokens(logits, skip=x.shape[1] - d)}

        count = 0
        for item in token_iter:
            if len(item) != 3:
                raise DecoderInputError(f"stream expects (hidden, embed, emotion) per token, got {len(item)} values")
            h, e, emo = self._reply_inputs(*(np.asarray(v, dtype=np.float32)[None] if not torch.is_tensor(v)
                                             else v[None] for v in item))
            hs.append(h[0])
            es.append(e[0])
            emos.append(emo[0])
            count += 1
            if count - 1 - lookahead >= 0:
                yield ready(count - 1 - lookahead)
        for i in range(max(0, count - lookahead), count):
            yield ready(i)


# ---------------------------------------------------------------------------------------------
# Targets: ids, durations from DTW spans, batches
# ---------------------------------------------------------------------------------------------
def check_ids(ids: torch.Tensor | np.ndarray, size: int, name: str) -> None:
    """Raise ``DecoderInputError`` naming the first id of ``name`` outside ``[0, size)``."""
    ids = torch.as_tensor(ids)
    bad = (ids < 0) | (ids >= size)
    if bool(bad.any()):
        raise DecoderInputError(f"{name} id {int(ids[bad][0])} is outside the vocabulary [0, {size}) "
                                f"({int(bad.sum())} bad ids); were the tokens made with another tokenizer?")


def durations_from_spans(frame_spans50, n_units: int, tolerance: int = 2) -> np.ndarray:
    """DTW token spans at 50 Hz -> frames per token at 25 Hz, summing to ``n_units`` exactly.

    ``frame_spans50``: ``[[start, end), ...]`` per token, contiguous from 0 to ``n50``. Each
    token *boundary* is mapped to the unit clock (``round(end * n_units / n50)``, halves up:
    with ``n_units = n50 / 2`` that is ``end / 2``), and durations are the differences of the
    boundaries, so they never go negative and always add up to ``n_units``. A token shorter
    than a unit may get 0 frames. ``n_units`` more than ``tolerance`` away from ``ceil(n50/2)``
    raises: then the spans belong to other frames than the units.
    """
    spans = np.asarray(frame_spans50, dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0:
        raise DecoderInputError("no token spans: an empty reply has no durations")
    if spans[0, 0] != 0 or np.any(spans[1:, 0] != spans[:-1, 1]) or np.any(spans[:, 1] < spans[:, 0]):
        raise DecoderInputError(f"token spans must be contiguous [start, end) pairs from frame 0, got {spans.tolist()[:6]}...")
    n50 = int(spans[-1, 1])
    if n50 == 0 or abs(n_units - math.ceil(n50 / 2)) > tolerance:
        raise DecoderInputError(f"the spans cover {n50} frames at 50 Hz = {math.ceil(n50 / 2)} units at 25 Hz, but the "
                                f"utterance has n_units = {n_units}")
    ends = np.floor(spans[:, 1] * n_units / n50 + 0.5).astype(np.int64)
    ends[-1] = n_units
    return np.diff(np.concatenate([[0], ends]))


def stage2_batch(items: list[dict]) -> dict:
    """Collate items into right-padded tensors (CPU).

    Each item: ``hidden``, ``embeds`` (N,H), ``emotion_gt`` (N,E), ``emotion_pred`` (N,E, may be
    missing or None), ``durations`` (N,), ``units``, ``pitch``, ``energy`` (F,) with
    ``F == durations.sum()``; an optional ``pair_id`` names the item in errors and an optional
    ``speaker`` (S,) is the reply voice's reference. Returns those keys plus ``token_mask`` (B,N)
    and ``frame_mask`` (B,F); ``speaker`` (B,S) when every item has one, else None. An empty
    reply (N = 0) raises.
    """
    if not items:
        raise DecoderInputError("stage2_batch got no items")
    name = lambda i: items[i].get("pair_id", f"item {i}")  # noqa: E731
    n_tok, n_frm = [], []
    for i, it in enumerate(items):
        n = len(it["durations"])
        if n == 0:
            raise DecoderInputError(f"{name(i)}: the reply has no tokens (N = 0); leave it out of stage 2")
        for key in ("hidden", "embeds", "emotion_gt") + (("emotion_pred",) if it.get("emotion_pred") is not None else ()):
            if len(it[key]) != n:
                raise DecoderInputError(f"{name(i)}: {key} has {len(it[key])} rows for {n} tokens")
        total = int(np.sum(it["durations"]))
        for key in ("units", "pitch", "energy"):
            if len(it[key]) != total:
                raise DecoderInputError(f"{name(i)}: {len(it[key])} {key} frames, but the durations add up to {total}")
        n_tok.append(n)
        n_frm.append(total)
    b, n, f = len(items), max(n_tok), max(n_frm)
    has_pred = all(it.get("emotion_pred") is not None for it in items)
    h, e = np.asarray(items[0]["hidden"]).shape[1], np.asarray(items[0]["emotion_gt"]).shape[1]
    out = {"hidden": torch.zeros(b, n, h), "embeds": torch.zeros(b, n, h), "emotion_gt": torch.zeros(b, n, e),
           "emotion_pred": torch.zeros(b, n, e) if has_pred else None,
           "token_mask": torch.zeros(b, n, dtype=torch.bool), "durations": torch.zeros(b, n, dtype=torch.long),
           "units": torch.zeros(b, f, dtype=torch.long), "pitch": torch.zeros(b, f, dtype=torch.long),
           "energy": torch.zeros(b, f, dtype=torch.long), "frame_mask": torch.zeros(b, f, dtype=torch.bool),
           "speaker": (torch.stack([torch.as_tensor(np.asarray(it["speaker"], dtype=np.float32)) for it in items])
                       if all(it.get("speaker") is not None for it in items) else None)}
    for i, it in enumerate(items):
        k, t = n_tok[i], n_frm[i]
        for key in ("hidden", "embeds", "emotion_gt") + (("emotion_pred",) if has_pred else ()):
            out[key][i, :k] = torch.as_tensor(np.asarray(it[key], dtype=np.float32))
        out["durations"][i, :k] = torch.as_tensor(np.asarray(it["durations"], dtype=np.int64))
        out["token_mask"][i, :k] = True
        for key in ("units", "pitch", "energy"):
            out[key][i, :t] = torch.as_tensor(np.asarray(it[key], dtype=np.int64))
        out["frame_mask"][i, :t] = True
    return out


# ---------------------------------------------------------------------------------------------
# The emotion schedule and the training-loop glue
# ---------------------------------------------------------------------------------------------
DEFAULT_SCHEDULE = {"kind": "linear", "start_fraction": 0.2, "end_fraction": 0.8, "end_alpha": 1.0}


def _check_schedule(cfg: dict) -> dict:
    kind = cfg.get("kind")
    allowed = {"linear": {"kind", "start_fraction", "end_fraction", "end_alpha"}, "fixed": {"kind", "alpha"}}
    if kind not in allowed:
        raise ValueError(f"emotion schedule kind must be 'linear' or 'fixed', got {kind!r}")
    unknown = sorted(set(cfg) - allowed[kind])
    if unknown:
        raise ValueError(f"unknown keys {unknown} for a {kind!r} schedule; valid: {sorted(allowed[kind])}")
    if kind == "fixed":
        cfg = {"alpha": 0.7, **cfg}
        if not 0.0 <= cfg["alpha"] <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {cfg['alpha']}")
        return cfg
    cfg = {**DEFAULT_SCHEDULE, **cfg}
    if not 0.0 <= cfg["start_fraction"] <= cfg["end_fraction"] <= 1.0:
        raise ValueError(f"need 0 <= start_fraction <= end_fraction <= 1, got {cfg['start_fraction']} and "
                         f"{cfg['end_fraction']}")
    if not 0.0 <= cfg["end_alpha"] <= 1.0:
        raise ValueError(f"end_alpha must be in [0, 1], got {cfg['end_alpha']}")
    return cfg


def emotion_mix(step: int, total_steps: int, schedule_cfg: dict) -> float:
    """The share ``alpha`` of *predicted* emotion at ``step``: emotion = (1 - alpha) gt + alpha pred.

    ``{"kind": "linear", "start_fraction", "end_fraction", "end_alpha"}``: 0 until
    ``start_fraction`` of training, then a straight line up to ``end_alpha`` at
    ``end_fraction``, flat after. ``{"kind": "fixed", "alpha": 0.7}``: constant (0.7 is the
    public code's 30 % ground truth / 70 % prediction).
    """
    cfg = _check_schedule(schedule_cfg)
    if cfg["kind"] == "fixed":
        return float(cfg["alpha"])
    progress = step / max(1, total_steps)
    start, end = cfg["start_fraction"], cfg["end_fraction"]
    if progress <= start:
        return 0.0
    if progress >= end:
        return float(cfg["end_alpha"])
    return float(cfg["end_alpha"] * (progress - start) / (end - start))


def schedule_from_preset(s2: dict) -> dict:
    """The emotion schedule for ``make_loss_fn`` from a preset's ``stage2`` section.

    ``schedule: linear`` -> ``{"kind": "linear", "start_fraction": schedule_start, "end_fraction":
    schedule_end, "end_alpha": schedule_alpha}``; ``schedule: fixed`` -> ``{"kind": "fixed",
    "alpha": schedule_fixed_share}`` (default 0.7, the public code's 30 % ground truth / 70 %
    prediction). The result is checked like any schedule.
    """
    kind = s2.get("schedule", "linear")
    if kind == "linear":
        missing = [k for k in ("schedule_start", "schedule_end", "schedule_alpha") if k not in s2]
        if missing:
            raise ValueError(f"stage2.schedule = 'linear' needs stage2 keys {missing} (see emo_lib/presets.yaml)")
        schedule = {"kind": "linear", "start_fraction": s2["schedule_start"], "end_fraction": s2["schedule_end"],
                    "end_alpha": s2["schedule_alpha"]}
    elif kind == "fixed":
        schedule = {"kind": "fixed", "alpha": s2.get("schedule_fixed_share", 0.7)}
    else:
        raise ValueError(f"stage2.schedule must be 'linear' or 'fixed', got {kind!r}")
    return _check_schedule(schedule)


def schedule_curve(total_steps: int, schedule_cfg: dict) -> np.ndarray:
    """``alpha`` at every step 0 .. total_steps - 1 (for a plot)."""
    return np.array([emotion_mix(s, total_steps, schedule_cfg) for s in range(total_steps)], dtype=np.float64)


def mix_emotion(batch: dict, alpha: float) -> dict:
    """The batch with ``emotion = (1 - alpha) emotion_gt + alpha emotion_pred`` added."""
    if alpha > 0 and batch.get("emotion_pred") is None:
        raise DecoderInputError(f"the emotion schedule asks for alpha = {alpha:.2f} of predicted emotion, but the "
                                "items have no emotion_pred (run stage 1 over them first)")
    emotion = batch["emotion_gt"] if alpha == 0 else (1 - alpha) * batch["emotion_gt"] + alpha * batch["emotion_pred"]
    return {**batch, "emotion": emotion}


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_loss_fn(total_steps: int, schedule_cfg: dict | None = None):
    """A ``loss_fn(model, batch_items, step)`` for ``train.train_loop``: collate, mix emotions, loss.

    ``total_steps`` is the loop's ``steps`` (the schedule's time axis). The returned terms add
    ``alpha`` so the schedule appears in the training history.
    """
    schedule = _check_schedule(dict(schedule_cfg or DEFAULT_SCHEDULE))

    def loss_fn(model: DecoderBase, batch_items: list, step: int = 0) -> dict:
        alpha = emotion_mix(step, total_steps, schedule)
        batch = _to_device(mix_emotion(stage2_batch(batch_items), alpha), model.device)
        terms = model.loss(batch)
        return {**terms, "alpha": torch.tensor(alpha)}

    return loss_fn


@torch.no_grad()
def evaluate_stage2(model: DecoderBase, items: list, alpha: float = 1.0, batch_size: int = 16) -> dict:
    """Teacher-forced held-out numbers (frame- and token-weighted means of the loss terms).

    ``alpha = 1`` feeds stage 1's predicted emotions, as at inference. Also the mean absolute
    duration error in frames of the rounded predictions, ``duration_mae_frames``. A decoder
    without durations (``predicts_durations = False``, e.g. ``"interleaved"``) reports NaN for
    ``duration_mse`` and ``duration_mae_frames``. The teacher-forced accuracies of an
    autoregressive decoder (it sees the previous true unit) are not comparable with those of
    the non-autoregressive durations decoder: compare free-running outputs (``generate``) instead.
    """
    with_durations = getattr(model, "predicts_durations", True)
    sums: dict = {}
    frames = tokens = 0
    abs_err = 0.0
    for start in range(0, len(items), batch_size):
        batch = _to_device(mix_emotion(stage2_batch(items[start : start + batch_size]), alpha), model.device)
        terms = model.loss(batch)
        f, n = int(batch["frame_mask"].sum()), int(batch["token_mask"].sum())
        for k, v in terms.items():
            weight = n if k == "duration_mse" else f
            sums[k] = sums.get(k, 0.0) + float(v) * weight
        if with_durations:
            predicted = model.predict_durations(batch["hidden"], batch["embeds"], batch["emotion"], batch["token_mask"],
                                                batch.get("speaker"))
            abs_err += float(((predicted - batch["durations"]).abs() * batch["token_mask"]).sum())
        frames, tokens = frames + f, tokens + n
    result = {k: v / max(1, tokens if k == "duration_mse" else frames) for k, v in sums.items() if k != "loss"}
    result["duration_mae_frames"] = abs_err / max(1, tokens)
    if not with_durations:
        result["duration_mse"] = result["duration_mae_frames"] = float("nan")
    return result


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def checkpoint_payload(model: DecoderBase, extra: dict | None = None) -> dict:
    """``payload_fn`` for ``train.train_loop``: kind, which decoder (its ``registry_name``), config and state."""
    return {"kind": STAGE2_CHECKPOINT_KIND, "decoder": model.registry_name, "config": model.config.to_dict(),
            "state": model.trainable_state(), **(extra or {})}


def payload_decoder(payload: dict) -> str:
    """The decoder name a stage-2 payload records; checkpoints from before the registry are ``"durations"``."""
    return payload.get("decoder", DEFAULT_DECODER)


def _decoder_for_config(config) -> str:
    """The registered decoder whose ``config_class`` is ``type(config)``."""
    _load_builtin_decoders()
    names = [name for name, cls in DECODERS.items() if cls.config_class is type(config)]
    if len(names) != 1:
        raise ValueError(f"cannot tell which decoder a {type(config).__name__} belongs to (matches: {names}); "
                         "pass decoder= to check_checkpoint")
    return names[0]


def check_checkpoint(payload: dict, config, path, decoder: str | None = None) -> None:
    """Refuse a checkpoint of another kind, another decoder or with another config (``check_resume``).

    ``decoder``: the name this run trains; by default the decoder whose config class ``config`` is.
    """
    from .train import CheckpointError

    if payload.get("kind") != STAGE2_CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a stage-2 checkpoint; delete it to start fresh or run {STAGE2_NOTEBOOK}.")
    want_decoder = decoder if decoder is not None else _decoder_for_config(config)
    if payload_decoder(payload) != want_decoder:
        raise CheckpointError(f"{path} holds a {payload_decoder(payload)!r} decoder, but this run asks for "
                              f"stage2.decoder = {want_decoder!r}. Resume with the same decoder, or start fresh in "
                              "another folder.")
    wanted = config.to_dict()
    for key, want in wanted.items():
        have = payload.get("config", {}).get(key)
        if have != want:
            raise CheckpointError(f"{path} was trained with {key} = {have!r}, but this run asks for {key} = {want!r}. "
                                  "Resume with the same setting, or start fresh in another folder.")


def save_decoder(path: str | Path, model: DecoderBase, extra: dict | None = None) -> Path:
    """Write the decoder atomically (``train.save_checkpoint``)."""
    from .train import save_checkpoint

    return save_checkpoint(path, checkpoint_payload(model, extra))


def load_decoder(path: str | Path, device: str = "cpu") -> DecoderBase:
    """A trained decoder from a checkpoint written by notebook 06 (eval mode).

    The class is the one the payload's ``"decoder"`` names (missing: ``"durations"``, the only
    decoder before the registry), so old checkpoints load as ``SpeechDecoder``.
    """
    from .train import CheckpointError, load_checkpoint

    payload = load_checkpoint(path, STAGE2_NOTEBOOK)
    if payload.get("kind") != STAGE2_CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a stage-2 checkpoint; run {STAGE2_NOTEBOOK} to make one.")
    try:
        cls = decoder_class(payload_decoder(payload))
        config = cls.config_class.from_dict(payload["config"])
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from err
    model = cls(config)
    try:
        model.load_trainable_state(payload["state"])
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}; run {STAGE2_NOTEBOOK} again.") from err
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# A run's stage-2 data: stage-1 states + DTW durations + speech tokens of the spoken reply
# ---------------------------------------------------------------------------------------------
def load_stage2_items(run, rows: list[dict], splits: tuple[str, ...], max_frames: int,
                      voices: dict | None = None) -> tuple[list[dict], dict]:
    """Training items of the kept pairs in ``splits``, read from notebooks 03, 05 and 06's outputs.

    Per pair: the frozen stage-1 model's ``hidden``, ``embeds`` and predicted ``emotion_pred``
    (``stage2/states_*.npy``), the DTW target trajectory ``emotion_gt`` (notebook 03), the token
    durations at 25 Hz from the DTW spans, and the reply's (unit, pitch, energy) frames
    (``tokens/tokens.npy``, notebook 05). A pair is skipped and counted when a piece is missing,
    when its token count differs between the pieces, or when it is longer than ``max_frames``
    (the decoder's training context): never padded or truncated silently. ``voices`` (speaker
    -> (160,) reference, ``pipeline.run_voices``) adds each reply speaker's voice as ``speaker``;
    a pair whose speaker has none is skipped and counted as ``no_voice``.
    """
    from .paths import read_jsonl
    from .store import FrameStore

    root = run.root
    hidden = FrameStore(run.require(root / "stage2" / "states_hidden.npy", "stage2_states"))
    embeds = FrameStore(run.require(root / "stage2" / "states_embeds.npy", "stage2_states"))
    predicted = FrameStore(run.require(root / "stage2" / "states_emotion.npy", "stage2_states"))
    targets = FrameStore(run.require(root / "features" / "trajectories.npy", "trajectories"))
    tokens = FrameStore(run.require(root / "tokens" / "tokens.npy", "speech_tokens"))
    spans = {s["pair_id"]: s for s in read_jsonl(run.require(root / "features" / "token_spans.jsonl", "trajectories"))}
    counts = {"selected": 0, "used": 0, "missing": 0, "token_mismatch": 0, "too_long": 0, "no_voice": 0}
    items = []
    for r in rows:
        if not r.get("kept", True) or r["split"] not in splits:
            continue
        counts["selected"] += 1
        pid, key = r["pair_id"], f"{r['pair_id']}_r"
        if pid not in hidden or pid not in targets or key not in tokens or pid not in spans:
            counts["missing"] += 1
            continue
        h, gt, span = hidden[pid], targets[pid], spans[pid]
        if not (len(h) == len(gt) == len(span["frame_spans"])):
            counts["token_mismatch"] += 1
            continue
        frames = tokens[key].astype(np.int64)
        if len(frames) > max_frames:
            counts["too_long"] += 1
            continue
        if voices is not None and r.get("response_speaker") not in voices:
            counts["no_voice"] += 1
            continue
        items.append({"pair_id": pid, "hidden": h, "embeds": embeds[pid], "emotion_gt": gt,
                      "emotion_pred": predicted[pid],
                      "durations": durations_from_spans(span["frame_spans"], len(frames)),
                      "units": frames[:, 0], "pitch": frames[:, 1], "energy": frames[:, 2],
                      **({"speaker": np.asarray(voices[r["response_speaker"]], dtype=np.float32)}
                         if voices is not None else {})})
        counts["used"] += 1
    return items, counts
