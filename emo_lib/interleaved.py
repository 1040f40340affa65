"""Stage 2, OpenS2S-style: read R LLM states, write W speech tokens, repeat; no durations.

``decoder.SpeechDecoder`` predicts how long each text token lasts and copies it onto that many
25 Hz frames (non-autoregressive). ``InterleavedDecoder`` is the alternative of OpenS2S (and of
LLaMA-Omni 2's read/write schedule): one causal Transformer over a single sequence in which
*read* positions carry stage 1's per-token vectors and *write* positions carry speech tokens.
It reads ``R = read_tokens`` text tokens, then writes ``W = write_units`` speech tokens, then
reads again, and so on; after the last text token it keeps writing until it emits the
end-of-speech unit ``EOS`` (unit id ``n_units``) or reaches ``max_frames``. It learns the
alignment between the two clocks itself: no durations, no DTW at inference.

The layout, with ``R = 2``, ``W = 3``, N = 5 text tokens and F = 9 speech frames ``u0 .. u8``
(``x_i`` = token ``i``'s fused vector, ``B`` = BOS; sequence order is left to right)::

    read      x0 x1          x2 x3          x4
    write           B  u0 u1       u2 u3 u4    u5 u6 u7 u8      <- input: the previous speech token
    predicts        u0 u1 u2       u3 u4 u5    u6 u7 u8 EOS     <- output at the same position

A write position's input is the previous speech token (unit + pitch + energy embeddings
summed; BOS for the first); its output is the current one (three heads), so the model is
autoregressive in units, like a language model. Read positions produce no target. Each
position's AdaLN condition is the emotion of the most recently read token. The last read block
may be shorter than R; after it the writes simply continue (W-sized blocks only matter for
streaming: ``stream`` hands out one block at a time).

**Why speech lags the text.** Units run at 25 Hz and speech carries about 3-4 text tokens per
second, i.e. some 6-8 units per token. The schedule writes only W = 8 units (0.32 s) per R = 4
tokens read, 2 units per token: the reader runs ahead of the writer by more and more, and by the
end of the text most of the speech is still to be written, as a tail with no more reads. That
is the point: a unit is written only when the words it belongs to (and a few after them) have
been read, so the writer never has to speak words it has not seen, and the LLM, which produces
text much faster than real time, is never kept waiting. The first unit needs only R tokens
(``first_unit_after_tokens``). If a reply were spoken faster than W/R units per token (12.5 text
tokens per second: not real speech), EOS would come before the last reads; the training
sequence then ends at EOS and those tokens are never read, in training as in generation.

**Teacher forcing is not comparable.** ``loss`` is teacher-forced: every write position sees
the *true* previous unit, so its ``unit_accuracy`` measures next-unit prediction given a perfect
past. ``SpeechDecoder``'s accuracy is given only the (true) durations and never sees a unit.
The two numbers answer different questions; compare the decoders on free-running outputs
(``generate``: units, WER and emotion of the synthesised speech), where the autoregressive
decoder's own mistakes feed back into it (exposure bias) and it must also decide when to stop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .decoder import (DecoderBase, DecoderConfigBase, DecoderBlock, DecoderInputError, GatedFusion, check_ids, make_norm, pick_pitch,
                      preset_values, register_decoder, sinusoidal_positions)

READ, WRITE = 0, 1


@dataclass
class InterleavedConfig(DecoderConfigBase):
    """Everything that fixes the shapes of an ``InterleavedDecoder``; saved in its checkpoints.

    ``read_tokens`` (R) text tokens are read before each block of ``write_units`` (W) speech
    tokens. ``max_frames`` caps a reply's speech frames (training examples must fit, ``generate``
    stops there). ``fusion`` and ``adaln`` are the ablation switches of ``Stage2Config``
    (``fusion="none"``: hidden state only and plain LayerNorm). The unit head has
    ``n_units + 1`` outputs: the last is EOS.
    """

    read_tokens: int = 4
    write_units: int = 8

    def __post_init__(self):
        self.check_shared(("read_tokens", "write_units", "max_frames", "n_units", "pitch_bins", "energy_bins",
                           "layers", "hidden_dim", "emotion_dim"))

    @property
    def eos(self) -> int:
        """The end-of-speech unit id: one past the k-means units."""
        return self.n_units


def interleaved_config_from_preset(cfg: dict, hidden_dim: int, emotion_dim: int,
                                   kmeans_meta: dict) -> InterleavedConfig:
    """``InterleavedConfig`` from a preset: ``cfg["stage2"]``'s ``dim``, ``layers``, ``heads``,
    ``max_frames``, ``fusion``, ``adaln``, ``read_tokens`` and ``write_units`` (defaults 4 and 8
    when absent); vocabularies from ``kmeans_meta``; widths from stage 1's states."""
    values = preset_values(cfg, ("dim", "layers", "heads", "max_frames", "fusion", "adaln"), kmeans_meta)
    s2 = cfg["stage2"]
    defaults = InterleavedConfig()
    return InterleavedConfig(hidden_dim=int(hidden_dim), emotion_dim=int(emotion_dim),
                             read_tokens=int(s2.get("read_tokens", defaults.read_tokens)),
                             write_units=int(s2.get("write_units", defaults.write_units)), **values)


def interleave_layout(n_tokens: int, n_frames: int, read_tokens: int, write_units: int) -> dict[str, np.ndarray]:
    """Where each read and write sits in the interleaved sequence of one reply.

    N = ``n_tokens`` text tokens, F = ``n_frames`` speech frames plus the EOS target (index F).
    Block b reads tokens ``[bR, min((b+1)R, N))`` and then writes W targets; after the last
    block the writes continue until EOS. Closed form: token t sits at ``t + (t // R) W``, target
    j at ``j + min((b + 1) R, N)`` with ``b = min(j // W, n_blocks - 1)``. Reads after EOS (a
    reply faster than W/R units per token) are left out: block b is read only if
    ``b W <= F``.

    Returns (L = reads kept + F + 1 positions):
      ``kind`` (L,): ``READ`` (0) or ``WRITE`` (1);
      ``token`` (L,): the token read here, or at a write the most recently read token (whose
      emotion conditions the position);
      ``frame`` (L,): at a write the target index j it predicts (F = EOS; its input is target
      j - 1, BOS for j = 0), -1 at reads;
      ``write_positions`` (F + 1,): the position of target j.
    """
    n, f, r, w = int(n_tokens), int(n_frames), int(read_tokens), int(write_units)
    if n < 1:
        raise DecoderInputError(f"an interleaved sequence needs at least one text token, got N = {n}")
    if f < 0 or r < 1 or w < 1:
        raise DecoderInputError(f"need n_frames >= 0, read_tokens >= 1 and write_units >= 1, got {f}, {r}, {w}")
    n_blocks = math.ceil(n / r)
    t = np.arange(n)
    t = t[(t // r) * w <= f]
    read_positions = t + (t // r) * w
    j = np.arange(f + 1)
    reads_before = np.minimum((np.minimum(j // w, n_blocks - 1) + 1) * r, n)
    write_positions = j + reads_before
    length = len(t) + f + 1
    kind = np.full(length, WRITE, dtype=np.int64)
    kind[read_positions] = READ
    token = np.empty(length, dtype=np.int64)
    token[read_positions] = t
    token[write_positions] = reads_before - 1
    frame = np.full(length, -1, dtype=np.int64)
    frame[write_positions] = j
    return {"kind": kind, "token": token, "frame": frame, "write_positions": write_positions.astype(np.int64)}


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over ``mask``; zeros (with a gradient path) when nothing is masked in."""
    if not bool(mask.any()):
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    chosen, wanted = logits[mask].float(), target[mask]
    return F.cross_entropy(chosen, wanted), (chosen.argmax(-1) == wanted).float().mean().detach()


@register_decoder("interleaved")
class InterleavedDecoder(DecoderBase):
    """Read R token vectors, write W speech tokens, repeat; greedy autoregressive generation.

    Read positions: ``token_proj(gate(LN h, LN e))`` (or ``LN h`` for ``hidden_only``/``none``),
    as in ``SpeechDecoder`` but without look-ahead (reading R tokens before writing *is* the
    look-ahead). Write positions: the sum of the previous speech token's unit, pitch and energy
    embeddings (a learned BOS vector first). Every position adds a read/write embedding and a
    sinusoidal position, goes through ``layers`` causal AdaLN blocks (``decoder.DecoderBlock``)
    conditioned on the standardised emotion of the most recent read token, and write positions
    predict unit (``n_units`` + EOS), pitch and energy. See the module docstring for the layout.
    """

    config_class = InterleavedConfig
    predicts_durations = False

    def __init__(self, config: InterleavedConfig):
        super().__init__()
        c = self.config = config
        self.hidden_norm = nn.LayerNorm(c.hidden_dim)
        self.embed_norm = nn.LayerNorm(c.hidden_dim) if c.fusion == "gate" else None
        self.fusion = GatedFusion(c.hidden_dim) if c.fusion == "gate" else None
        self.token_proj = nn.Linear(c.hidden_dim, c.dim)
        self.unit_embedding = nn.Embedding(c.n_units, c.dim)
        self.pitch_embedding = nn.Embedding(c.pitch_bins, c.dim)
        self.energy_embedding = nn.Embedding(c.energy_bins, c.dim)
        self.bos = nn.Parameter(torch.randn(c.dim) * 0.02)
        self.kind_embedding = nn.Embedding(2, c.dim)
        self.blocks = nn.ModuleList(DecoderBlock(c.dim, c.heads, c.emotion_dim, c.use_adaln, c.dropout)
                                    for _ in range(c.layers))
        self.final_norm = make_norm(c.dim, c.emotion_dim, c.use_adaln)
        self.unit_head = nn.Linear(c.dim, c.n_units + 1)
        self.pitch_head = nn.Linear(c.dim, c.pitch_bins)
        self.energy_head = nn.Linear(c.dim, c.energy_bins)
        self._register_emotion_stats(c.emotion_dim)

    @classmethod
    def config_from_preset(cls, cfg: dict, hidden_dim: int, emotion_dim: int, kmeans_meta: dict) -> InterleavedConfig:
        return interleaved_config_from_preset(cfg, hidden_dim, emotion_dim, kmeans_meta)

    @property
    def first_unit_after_tokens(self) -> int:
        """The first write comes after the first read block: R text tokens (fewer if the reply is shorter)."""
        return self.config.read_tokens

    # -- pieces ---------------------------------------------------------------------------------
    def token_vectors(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """(..., H) x 2 -> (..., dim): the read input of each token (per token, no look-ahead)."""
        h = self.hidden_norm(hidden)
        x = h if self.fusion is None else self.fusion(h, self.embed_norm(embeds))
        return self.token_proj(x)

    def speech_vectors(self, units: torch.Tensor, pitch: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """(...,) ids x 3 -> (..., dim): a write input, the sum of the three token embeddings."""
        return self.unit_embedding(units) + self.pitch_embedding(pitch) + self.energy_embedding(energy)

    def run_blocks(self, x: torch.Tensor, cond: torch.Tensor, past: list | None = None) -> tuple[torch.Tensor, list]:
        """Causal blocks + final norm over positions (B,T,dim) with conditions (B,T,E); returns the new KV cache."""
        cache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cond, None if past is None else past[i])
            cache.append(kv)
        return self.final_norm(x, cond), cache

    def heads(self, y: torch.Tensor) -> dict:
        return {"unit_logits": self.unit_head(y), "pitch_logits": self.pitch_head(y),
                "energy_logits": self.energy_head(y)}

    def _layouts(self, n_tokens: list[int], n_frames: list[int], device) -> dict:
        """Right-padded layouts of a batch: kind, token, frame (B, L) and write_positions (B, F_max + 1)."""
        c = self.config
        layouts = [interleave_layout(n, f, c.read_tokens, c.write_units) for n, f in zip(n_tokens, n_frames)]
        b, length, targets = len(layouts), max(len(x["kind"]) for x in layouts), max(n_frames) + 1
        out = {"kind": np.zeros((b, length), np.int64), "token": np.zeros((b, length), np.int64),
               "frame": np.zeros((b, length), np.int64), "write_positions": np.zeros((b, targets), np.int64)}
        for i, x in enumerate(layouts):
            k = len(x["kind"])
            out["kind"][i, :k], out["token"][i, :k] = x["kind"], x["token"]
            out["frame"][i, :k] = np.maximum(x["frame"], 0)
            out["write_positions"][i, : len(x["write_positions"])] = x["write_positions"]
        return {k: torch.as_tensor(v, device=device) for k, v in out.items()}

    # -- training -------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor, emotion: torch.Tensor, token_mask: torch.Tensor,
                units: torch.Tensor, pitch: torch.Tensor, energy: torch.Tensor, frame_mask: torch.Tensor) -> dict:
        """Teacher-forced pass over right-padded replies -> logits per target, in target order.

        Inputs as in ``stage2_batch``: (B,N,H) x 2, (B,N,E), token_mask (B,N), units/pitch/energy
        and frame_mask (B,F). Returns ``unit_logits`` (B,F+1,n_units+1), ``pitch_logits``,
        ``energy_logits`` (B,F+1,·) for targets j = 0 .. F (j = F_row is that row's EOS) and
        ``target_mask`` (B,F+1): j <= F_row. A row longer than ``max_frames`` raises.
        """
        token_mask, frame_mask = token_mask.bool(), frame_mask.bool()
        n_tokens, n_frames = token_mask.sum(1).tolist(), frame_mask.sum(1).tolist()
        if max(n_frames) > self.config.max_frames:
            raise DecoderInputError(f"a reply of {max(n_frames)} unit frames is longer than max_frames = "
                                    f"{self.config.max_frames}; leave such examples out of training or raise "
                                    "max_frames")
        lay = self._layouts(n_tokens, n_frames, hidden.device)
        b, length = lay["kind"].shape
        f = units.shape[1]
        dim = self.config.dim
        read_in = torch.gather(self.token_vectors(hidden, embeds), 1, lay["token"][..., None].expand(-1, -1, dim))
        previous = torch.cat([self.bos.expand(b, 1, dim), self.speech_vectors(units, pitch, energy)], 1)
        write_in = torch.gather(previous, 1, lay["frame"].clamp(max=f)[..., None].expand(-1, -1, dim))
        x = torch.where((lay["kind"] == READ)[..., None], read_in, write_in) + self.kind_embedding(lay["kind"])
        x = x + sinusoidal_positions(torch.arange(length, device=x.device), dim)
        cond_tokens = self.emotion_condition(emotion)
        cond = torch.gather(cond_tokens, 1, lay["token"][..., None].expand(-1, -1, cond_tokens.shape[-1]))
        y, _ = self.run_blocks(x, cond)
        y = torch.gather(y, 1, lay["write_positions"][..., None].expand(-1, -1, dim))
        j = torch.arange(lay["write_positions"].shape[1], device=x.device)
        return {**self.heads(y), "target_mask": j[None] <= torch.as_tensor(n_frames, device=x.device)[:, None]}

    def loss(self, batch: dict) -> dict:
        """``CE_unit (frames + EOS) + prosody_weight (CE_pitch + CE_energy)`` and accuracies (teacher-forced).

        ``batch``: ``stage2_batch`` + ``mix_emotion`` (``durations`` are ignored). The accuracies
        count real frames only (not EOS). ``duration_mse`` is a zero tensor: this decoder has no
        durations (the key is there so training histories of both decoders have the same terms).
        """
        c = self.config
        frame_mask = batch["frame_mask"].bool()
        n_frames = frame_mask.sum(1)
        targets = {}
        for name, size in (("units", c.n_units), ("pitch", c.pitch_bins), ("energy", c.energy_bins)):
            targets[name] = batch[name].long()
            check_ids(targets[name][frame_mask], size, name)
        out = self(batch["hidden"], batch["embeds"], batch["emotion"], batch["token_mask"], targets["units"],
                   targets["pitch"], targets["energy"], frame_mask)
        rows = torch.arange(len(n_frames), device=n_frames.device)
        for name in targets:
            targets[name] = F.pad(targets[name] * frame_mask, (0, 1))
        targets["units"][rows, n_frames] = c.eos
        j = torch.arange(targets["units"].shape[1], device=n_frames.device)
        real = j[None] < n_frames[:, None]
        terms = {}
        unit_ce, _ = _masked_ce(out["unit_logits"], targets["units"], out["target_mask"])
        _, unit_accuracy = _masked_ce(out["unit_logits"], targets["units"], real)
        terms["unit_ce"], terms["unit_accuracy"] = unit_ce, unit_accuracy
        for name in ("pitch", "energy"):
            terms[f"{name}_ce"], terms[f"{name}_accuracy"] = _masked_ce(out[f"{name}_logits"], targets[name], real)
        terms["duration_mse"] = torch.zeros((), device=unit_ce.device)
        loss = terms["unit_ce"] + c.prosody_weight * (terms["pitch_ce"] + terms["energy_ce"])
        return {"loss": loss, **terms}

    # -- inference ------------------------------------------------------------------------------
    def _stack_rows(self, rows: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token ``(h, e, emo)`` rows (tensors or arrays) -> one read block's (k,H), (k,H), (k,E), checked."""
        def as_tensor(value) -> torch.Tensor:
            value = value if torch.is_tensor(value) else torch.as_tensor(np.asarray(value, dtype=np.float32))
            return value.to(self.device)

        return self._reply_inputs(*(torch.stack([as_tensor(r[k]) for r in rows]) for k in range(3)))

    def _decode(self, rows: Iterable, use_cache: bool) -> Iterator[dict]:
        """The greedy read/write loop over ``(h, e, emo)`` rows; yields one dict per write block."""
        writer = _GreedyWriter(self, use_cache)
        pending: list = []
        for row in rows:
            if len(row) != 3:
                raise DecoderInputError(f"expected (hidden, embed, emotion) per token, got {len(row)} values")
            if writer.done:
                continue  # EOS came before the text ended: the rest is never read (see the module docstring)
            pending.append(row)
            if len(pending) == self.config.read_tokens:
                writer.read(self._stack_rows(pending))
                pending = []
                yield writer.write_block(self.config.write_units)
        if pending and not writer.done:
            writer.read(self._stack_rows(pending))
        while writer.tokens_read and not writer.done:
            yield writer.write_block(self.config.write_units)

    @torch.no_grad()
    def generate(self, hidden, embeds, emotion, use_cache: bool = True, speaker=None) -> dict:
        """One reply (N,H), (N,H), (N,E) -> greedy ``units``, ``pitch``, ``energy`` (F,) long.

        ``speaker`` is accepted for the same call as ``SpeechDecoder.generate`` and ignored: this
        variant has no voice input (OpenS2S's units carry no pitch; the kit's do, see notebook 09).

        Reads R tokens, writes up to W tokens, ..., then writes until EOS or ``max_frames``.
        ``durations`` is an empty tensor (this decoder has none); ``eos`` says whether it stopped
        with EOS (False: ``max_frames`` was reached); ``tokens_read`` how many tokens were read.
        ``use_cache=False`` re-runs the whole sequence at every write (slow; for checking the KV
        cache). An empty reply gives empty outputs. Call ``model.eval()`` first (dropout).
        """
        h, e, emo = self._reply_inputs(hidden, embeds, emotion)
        chunks = list(self._decode(zip(h, e, emo), use_cache))
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        result = {k: torch.cat([empty] + [ch[k] for ch in chunks]) for k in ("units", "pitch", "energy")}
        return {**result, "durations": empty.clone(), "eos": bool(chunks and chunks[-1]["eos"]),
                "tokens_read": chunks[-1]["tokens_read"] if chunks else 0}

    @torch.no_grad()
    def stream(self, token_iter: Iterable, speaker=None) -> Iterator[dict]:
        """Consume ``(h_i, e_i, emo_i)`` one token at a time; yield each write block as soon as it is written.

        ``speaker`` is ignored, as in ``generate``.

        After every R tokens (and once more when the input ends with a partial block) one block
        of at most W speech tokens is written; after the input ends, W-sized blocks follow until
        EOS or ``max_frames``. Yields ``{"tokens_read", "units", "pitch", "energy", "eos"}``
        ((k,) each, k <= W; the block that meets EOS may be shorter or empty). The concatenation
        equals ``generate``. Tokens that arrive after EOS are consumed and ignored.
        """
        yield from self._decode(token_iter, use_cache=True)


class _GreedyWriter:
    """Greedy decoding state of one reply: the interleaved sequence so far, with or without a KV cache.

    ``read`` appends read positions; ``write_block`` appends write positions one at a time, each
    fed the previous speech token and returning the argmax of the three heads, until W tokens,
    EOS or ``max_frames``.
    """

    def __init__(self, model: InterleavedDecoder, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        self.past: list | None = None
        self.inputs: list[torch.Tensor] = []  # without a cache: every position's input and condition
        self.conds: list[torch.Tensor] = []
        self.length = 0
        self.cond: torch.Tensor | None = None  # the latest read token's condition (1, 1, E)
        self.previous = model.bos.view(1, 1, -1)
        self.units: list[int] = []
        self.pitch: list[int] = []
        self.energy: list[int] = []
        self.tokens_read = 0
        self.done = self.eos = False

    def _feed(self, x: torch.Tensor, cond: torch.Tensor, need_output: bool) -> torch.Tensor | None:
        """Append positions (1,k,dim) with conditions (1,k,E); the last position's output (1, dim) if asked."""
        k = x.shape[1]
        x = x + sinusoidal_positions(torch.arange(self.length, self.length + k, device=x.device), x.shape[-1])
        self.length += k
        if self.use_cache:
            y, self.past = self.model.run_blocks(x, cond, self.past)
            return y[:, -1]
        self.inputs.append(x)
        self.conds.append(cond)
        if not need_output:
            return None
        y, _ = self.model.run_blocks(torch.cat(self.inputs, 1), torch.cat(self.conds, 1))
        return y[:, -1]

    def read(self, reply: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Append the read positions of k tokens (k,H), (k,H), (k,E)."""
        m = self.model
        hidden, embeds, emotion = reply
        x = m.token_vectors(hidden, embeds)[None] + m.kind_embedding.weight[READ]
        cond = m.emotion_condition(emotion)[None]
        self._feed(x, cond, need_output=False)
        self.cond = cond[:, -1:]
        self.tokens_read += hidden.shape[0]

    def write_one(self) -> bool:
        """One write position; False at EOS. ``done`` is set at EOS or once ``max_frames`` tokens are written."""
        m = self.model
        y = self._feed(self.previous + m.kind_embedding.weight[WRITE], self.cond, need_output=True)
        logits = m.heads(y)
        unit = int(logits["unit_logits"][0].argmax())
        if unit == m.config.eos:
            self.done = self.eos = True
            return False
        pitch = int(pick_pitch(logits["pitch_logits"].reshape(1, -1), m.pitch_decoding)[0])
        energy = int(logits["energy_logits"][0].argmax())
        self.units.append(unit)
        self.pitch.append(pitch)
        self.energy.append(energy)
        ids = [torch.tensor([[v]], device=y.device) for v in (unit, pitch, energy)]
        self.previous = m.speech_vectors(*ids)
        self.done = len(self.units) >= m.config.max_frames  # no empty block after the last one
        return True

    def write_block(self, size: int) -> dict:
        """Up to ``size`` writes; the speech tokens written, as (k,) long tensors."""
        start = len(self.units)
        for _ in range(size):
            if self.done or not self.write_one():
                break
        device = self.model.device
        return {"tokens_read": self.tokens_read, "eos": self.eos,
                **{k: torch.tensor(getattr(self, k)[start:], dtype=torch.long, device=device)
                   for k in ("units", "pitch", "energy")}}


class IncrementalWriter:
    """``push`` / ``finish`` twin of ``InterleavedDecoder.stream`` for a caller that hands tokens over one by one.

    ``push(h_i, e_i, emo_i)`` returns the write blocks that token makes final: one block after
    every R-th token, none otherwise (and none once EOS was written); ``finish()`` reads a last
    partial block and writes until EOS or ``max_frames``. Blocks are the dicts of ``stream``;
    concatenated they equal ``generate`` on the whole reply (tested).
    """

    def __init__(self, model: "InterleavedDecoder"):
        self.model = model
        self.writer = _GreedyWriter(model, use_cache=True)
        self.pending: list = []
        self.finished = False

    @torch.no_grad()
    def push(self, hidden, embed, emotion) -> list[dict]:
        if self.finished:
            raise DecoderInputError("push after finish()")
        if self.writer.done:
            return []
        self.pending.append((hidden, embed, emotion))
        if len(self.pending) < self.model.config.read_tokens:
            return []
        self.writer.read(self.model._stack_rows(self.pending))
        self.pending = []
        return [self.writer.write_block(self.model.config.write_units)]

    @torch.no_grad()
    def finish(self) -> list[dict]:
        if self.finished:
            raise DecoderInputError("finish() called twice")
        self.finished = True
        blocks = []
        if self.pending and not self.writer.done:
            self.writer.read(self.model._stack_rows(self.pending))
        while self.writer.tokens_read and not self.writer.done:
            blocks.append(self.writer.write_block(self.model.config.write_units))
        return blocks


def incremental(model: "InterleavedDecoder") -> IncrementalWriter:
    """A fresh ``IncrementalWriter`` for one reply (``model.eval()`` first)."""
    return IncrementalWriter(model)
