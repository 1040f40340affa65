"""Stage-1 speech adapters, swappable by name: how the query's 50 Hz frames become LLM input embeddings.

Every adapter takes the two 50 Hz streams of the same audio and returns a sequence of LLM-width
embeddings that ``llm.SpeechLLM`` splices into the chat prompt in place of the user's words::

    forward(semantic (B, T50, Ds), emotion (B, T50, De), mask (B, T50) bool, replace=None)
        -> embeds (B, T', H), mask (B, T') bool

``mask`` marks the valid frames of each row, valid frames first (right padding); the output mask
is again a prefix mask (valid positions first), so the splice can cut row ``i`` at
``mask[i].sum()``. Padded output positions are zero, and padding never changes valid outputs.

``replace`` (equivalence replacement, only ``dual_info`` uses it) is ``None`` or a list of length
B holding ``None`` or an ``(L_i, H)`` tensor per row. Adapters without replacement
(``supports_replacement = False``) raise a ValueError when any entry is not ``None``, so that a
replacement never goes silently unapplied; ``None`` or a list of ``None`` is accepted.

Class attributes every adapter declares:

- ``uses_emotion``: False when the emotion stream is ignored (the model then needs no emotion
  frames of the right width).
- ``supports_replacement``: True when ``replace`` is honoured.

Registered names (``ADAPTERS``; build one with ``build_adapter``):

- ``fused``: the paper's adapter, ``encoders.SpeechProjector`` (state-dict keys unchanged).
- ``interleaved``: the authors' public code, the two streams alternating in time.
- ``semantic_only``: no emotion encoder (the ablation).
- ``dual_info``: the Dual-Information SLM's two heterogeneous adapters (a variant).
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.nn import functional as F

from .encoders import ADAPTER_STRIDE, DownsampleAdapter, SpeechProjector

ADAPTERS: dict[str, type] = {}


def register_adapter(name: str):
    """Class decorator: make an adapter buildable by ``name`` (``build_adapter(name, ...)``)."""

    def register(cls):
        if name in ADAPTERS and ADAPTERS[name] is not cls:
            raise ValueError(f"an adapter named {name!r} is already registered ({ADAPTERS[name].__name__})")
        for attribute in ("uses_emotion", "supports_replacement"):
            if not isinstance(getattr(cls, attribute, None), bool):
                raise TypeError(f"adapter {cls.__name__} must declare the class attribute {attribute}: bool")
        ADAPTERS[name] = cls
        cls.adapter_name = name
        return cls

    return register


def _accepted_options(cls) -> set[str]:
    """Keyword options a constructor takes beyond the three widths."""
    params = inspect.signature(cls.__init__).parameters
    return {n for n in params if n not in ("self", "semantic_dim", "emotion_dim", "llm_dim")}


def build_adapter(name: str, semantic_dim: int, emotion_dim: int, llm_dim: int, **options) -> nn.Module:
    """The adapter registered as ``name`` for these widths.

    ``options`` that this adapter does not take are ignored, so one config can build every
    adapter (``soft_prompt_length`` only matters to ``dual_info``); an option that no registered
    adapter takes is a typo and raises a ValueError, as does an unknown ``name``.
    """
    if name not in ADAPTERS:
        raise ValueError(f"unknown speech adapter {name!r}; registered adapters: {sorted(ADAPTERS)} "
                         "(set stage1.adapter in the preset to one of them)")
    known = set().union(*(_accepted_options(c) for c in ADAPTERS.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown adapter option(s) {unknown}; options the registered adapters take: {sorted(known)}")
    cls = ADAPTERS[name]
    mine = _accepted_options(cls)
    return cls(semantic_dim, emotion_dim, llm_dim, **{k: v for k, v in options.items() if k in mine})


def check_shapes(semantic: torch.Tensor, emotion: torch.Tensor, mask: torch.Tensor) -> None:
    """Both streams are 50 Hz frames of the same audio: they must share (batch, frames) with the mask."""
    if semantic.shape[:2] != emotion.shape[:2] or semantic.shape[:2] != mask.shape:
        raise ValueError(
            f"semantic {tuple(semantic.shape)}, emotion {tuple(emotion.shape)} and mask {tuple(mask.shape)} "
            "must share (batch, frames): both streams are 50 Hz frames of the same audio"
        )


def refuse_replacement(adapter: nn.Module, replace) -> None:
    """Raise if ``replace`` asks an adapter without equivalence replacement to replace anything."""
    if replace is not None and any(r is not None for r in replace):
        raise ValueError(f"the {adapter.adapter_name!r} adapter has no equivalence replacement; only adapters with "
                         f"supports_replacement ({[n for n, c in ADAPTERS.items() if c.supports_replacement]}) take it")


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) and (B, T, ...) -> (B, 2T, ...) alternating a1, b1, a2, b2, ..."""
    return torch.stack([a, b], dim=2).flatten(1, 2)


# ---------------------------------------------------------------------------------------------
# The paper's adapter and its public-code / ablation siblings
# ---------------------------------------------------------------------------------------------
@register_adapter("fused")
class FusedAdapter(SpeechProjector):
    """The paper's adapter (Emotion Omni, Sec. 3.1): ``encoders.SpeechProjector`` under the registry.

    Each stream goes through its own convolutional ``DownsampleAdapter`` (50 Hz -> 10 Hz); the
    two 10 Hz frames of each 100 ms are concatenated and one Linear maps them to the LLM width.
    semantic (B, T50, Ds) + emotion (B, T50, De) -> (B, ceil(T50 / 5), H).
    A subclass without new modules, so its state-dict keys are SpeechProjector's
    (``semantic_adapter.*``, ``emotion_adapter.*``, ``project.*``): old checkpoints load.
    """

    uses_emotion = True
    supports_replacement = False

    def __init__(self, semantic_dim: int, emotion_dim: int, llm_dim: int):
        super().__init__(semantic_dim, emotion_dim, llm_dim)

    def forward(self, semantic, emotion, mask, replace=None):
        refuse_replacement(self, replace)
        return super().forward(semantic, emotion, mask)


@register_adapter("interleaved")
class InterleavedAdapter(nn.Module):
    """The authors' public code: the two streams projected separately and interleaved in time.

    Each stream has its own ``DownsampleAdapter`` (50 Hz -> 10 Hz) and its own Linear to the LLM
    width; the sequences alternate (s1, e1, s2, e2, ...), so the LLM reads 20 positions per second
    instead of 10 and relates content and emotion through attention, not through one joint
    projection. semantic (B, T50, Ds) + emotion (B, T50, De) -> (B, 2 * ceil(T50 / 5), H); the mask
    is interleaved likewise (both positions of a 100 ms block share its validity).
    """

    uses_emotion = True
    supports_replacement = False

    def __init__(self, semantic_dim: int, emotion_dim: int, llm_dim: int):
        super().__init__()
        self.semantic_adapter = DownsampleAdapter(semantic_dim, semantic_dim)
        self.emotion_adapter = DownsampleAdapter(emotion_dim, emotion_dim)
        self.semantic_project = nn.Linear(semantic_dim, llm_dim)
        self.emotion_project = nn.Linear(emotion_dim, llm_dim)

    def forward(self, semantic, emotion, mask, replace=None):
        check_shapes(semantic, emotion, mask)
        refuse_replacement(self, replace)
        s, out_mask = self.semantic_adapter(semantic, mask)
        e, _ = self.emotion_adapter(emotion, mask)
        s = self.semantic_project(s) * out_mask[..., None]
        e = self.emotion_project(e) * out_mask[..., None]
        return interleave(s, e), interleave(out_mask, out_mask)


@register_adapter("semantic_only")
class SemanticOnlyAdapter(nn.Module):
    """The "without emotion encoder" ablation: Whisper frames only.

    ``DownsampleAdapter`` (50 Hz -> 10 Hz) + Linear to the LLM width; the emotion frames are
    ignored (``uses_emotion = False``), so emotion can reach the reply only through what the
    semantic encoder happens to keep of it. semantic (B, T50, Ds) -> (B, ceil(T50 / 5), H).
    """

    uses_emotion = False
    supports_replacement = False

    def __init__(self, semantic_dim: int, emotion_dim: int, llm_dim: int):
        super().__init__()
        self.semantic_adapter = DownsampleAdapter(semantic_dim, semantic_dim)
        self.project = nn.Linear(semantic_dim, llm_dim)

    def forward(self, semantic, emotion, mask, replace=None):
        if semantic.shape[:2] != mask.shape:
            raise ValueError(f"semantic {tuple(semantic.shape)} and mask {tuple(mask.shape)} must share (batch, frames)")
        refuse_replacement(self, replace)
        s, out_mask = self.semantic_adapter(semantic, mask)
        return self.project(s) * out_mask[..., None], out_mask


# ---------------------------------------------------------------------------------------------
# Dual-Information SLM (a variant)
# ---------------------------------------------------------------------------------------------
def sinusoidal_positions(n: int, width: int, device=None) -> torch.Tensor:
    """(n, width) fixed sine/cosine position codes (Vaswani et al.): no length limit, no weights."""
    position = torch.arange(n, dtype=torch.float32, device=device)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / width))
    codes = torch.zeros(n, width, device=device)
    codes[:, 0::2] = torch.sin(position * rate)
    codes[:, 1::2] = torch.cos(position * rate)[:, : width // 2]
    return codes


def stack_frames(x: torch.Tensor, mask: torch.Tensor, k: int = ADAPTER_STRIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T50, D) -> (B, ceil(T50 / k), k * D): ``k`` consecutive frames concatenated, and the mask.

    Padded frames are zeroed and the input right-padded with zeros to a multiple of ``k``, so a
    row's valid outputs do not depend on the batch's padding; an output frame is valid if any of
    its ``k`` input frames is (as in ``encoders.downsample_mask``).
    """
    pad = (-x.shape[1]) % k
    x = F.pad(x * mask[..., None], (0, 0, 0, pad))
    out_mask = F.pad(mask, (0, pad)).reshape(mask.shape[0], -1, k).any(-1)
    return x.reshape(x.shape[0], -1, k * x.shape[-1]), out_mask


@register_adapter("dual_info")
class DualInfoAdapter(nn.Module):
    """Dual-Information SLM (Wang et al., ICME 2025, arXiv 2508.08095): two heterogeneous adapters.

    - Paralinguistic: Linear(De -> 256) + sine position codes, a 2-layer Transformer encoder
      (width 256, 4 heads, dropout 0.1, key-padding masked) over the 50 Hz emotion frames, then
      attention pooling with ``soft_prompt_length`` (K) learned queries and a Linear to H: a
      fixed-length soft prompt of K vectors, whatever the query's duration.
    - Linguistic: frame stacking of the semantic frames (5 consecutive 50 Hz frames concatenated
      -> 10 Hz, 5 * Ds wide), then Linear -> GELU -> Linear to H.

    Output: ``[K soft-prompt vectors ; linguistic vectors]``, (B, K + ceil(T50 / 5), H), mask True
    on the K prompt vectors and on the valid linguistic ones.

    Equivalence-replacement regularization: ``replace[i]``, an (L_i, H) tensor, replaces row i's
    linguistic vectors by the LLM's own embeddings of the query's transcript (the soft prompt is
    kept); row i then has K + L_i valid positions. The transcript is an equivalent of what the
    linguistic adapter should express, so the LLM learns to read both interchangeably, and the
    adapter's output is pulled toward the text-embedding space instead of task-specific vectors.
    The paper describes this only at a high level (the replacement is applied with "controlled
    randomness"); replacing each training example's linguistic part with probability
    ``replacement_prob`` (decided in ``llm.SpeechLLM``, never at evaluation or generation) is
    the kit's reading of it, not a detail taken from the paper or its code.
    """

    uses_emotion = True
    supports_replacement = True

    def __init__(self, semantic_dim: int, emotion_dim: int, llm_dim: int, soft_prompt_length: int = 4,
                 width: int = 256, layers: int = 2, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        if soft_prompt_length < 1:
            raise ValueError(f"soft_prompt_length must be at least 1, got {soft_prompt_length}")
        self.soft_prompt_length = soft_prompt_length
        self.para_in = nn.Linear(emotion_dim, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.para_encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.para_norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(soft_prompt_length, width) * width ** -0.5)
        self.pool = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.para_out = nn.Linear(width, llm_dim)
        self.ling = nn.Sequential(nn.Linear(ADAPTER_STRIDE * semantic_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    def soft_prompt(self, emotion: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T50, De) + (B, T50) mask -> (B, K, H). Every row needs at least one valid frame."""
        if not bool(mask.any(1).all()):
            raise ValueError("every row needs at least one valid emotion frame for the soft prompt")
        x = self.para_in(emotion) + sinusoidal_positions(emotion.shape[1], self.para_in.out_features, emotion.device)
        x = self.para_norm(self.para_encoder(x, src_key_padding_mask=~mask))
        queries = self.queries[None].expand(len(x), -1, -1)
        pooled, _ = self.pool(queries, x, x, key_padding_mask=~mask, need_weights=False)
        return self.para_out(pooled)

    def linguistic(self, semantic: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T50, Ds) -> (B, ceil(T50 / 5), H) and its 10 Hz mask."""
        stacked, out_mask = stack_frames(semantic, mask)
        return self.ling(stacked) * out_mask[..., None], out_mask

    def forward(self, semantic, emotion, mask, replace=None):
        check_shapes(semantic, emotion, mask)
        prompt = self.soft_prompt(emotion, mask)
        ling, ling_mask = self.linguistic(semantic, mask)
        b, k = len(prompt), self.soft_prompt_length
        if replace is not None and len(replace) != b:
            raise ValueError(f"replace has {len(replace)} entries for a batch of {b}")
        rows = []
        for i in range(b):
            given = None if replace is None else replace[i]
            if given is None:
                rows.append(ling[i, : int(ling_mask[i].sum())])
            else:
                if given.dim() != 2 or given.shape[1] != ling.shape[-1]:
                    raise ValueError(f"replace[{i}] must be (tokens, {ling.shape[-1]}), got {tuple(given.shape)}")
                rows.append(given.to(ling.dtype))
        length = max(len(r) for r in rows)
        out = ling.new_zeros(b, k + length, ling.shape[-1])
        out_mask = torch.zeros(b, k + length, dtype=torch.bool, device=ling.device)
        out[:, :k] = prompt.to(ling.dtype)
        out_mask[:, :k] = True
        for i, r in enumerate(rows):
            out[i, k : k + len(r)] = r
            out_mask[i, k : k + len(r)] = True
        return out, out_mask
