"""How much of the words does a sequence of frames or tokens hold? A CTC character probe.

Notebook 05 claims that content units carry *what* is said. Mutual information with the speaker
and the emotion shows what they do *not* carry; this module measures what they *do*: a small
recurrent network is trained with CTC (Graves et al., 2006) to spell the transcript from the
sequence alone, on training utterances, and its character error rate (CER) is measured on
held-out speakers. The same probe on other inputs gives the comparison that makes the number mean
something: the continuous Whisper frames the units were cut from (what quantisation loses), more
or fewer units, and the pitch and energy tokens alone (a control that should spell nothing).

CTC in two lines: the network emits, at every frame, a distribution over the characters plus a
*blank*; a transcript's probability is the sum over every frame-level path that collapses to it
(merge repeats, drop blanks), computed by dynamic programming (``torch.nn.functional.ctc_loss``).
Greedy decoding takes the best symbol per frame and collapses.

The probe is deliberately small (six residual convolutions) and has no language model, so its
error rates are upper bounds on what the inputs hold, comparable between inputs trained at the
same budget, not a speech recognizer's figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .asr import _edit_distance, normalize_for_wer

ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # id 0 is the CTC blank, character i has id i + 1
BLANK = 0


class ProbeError(ValueError):
    """Inputs the content probe cannot use (wrong shapes, ids out of range, nothing to learn from)."""


def spelling(text: str) -> str:
    """The characters the probe spells: lower-case words of ``normalize_for_wer``, one space between.

    Characters outside a-z (digits, accented letters) are dropped; apostrophes are already gone.
    """
    words = ("".join(c for c in word if c in ALPHABET) for word in normalize_for_wer(text))
    return " ".join(w for w in words if w)


def char_ids(text: str) -> np.ndarray:
    """``spelling(text)`` as CTC target ids (1..27), int64."""
    return np.array([ALPHABET.index(c) + 1 for c in spelling(text)], dtype=np.int64)


def character_error_rate(reference: str, hypothesis: str) -> float:
    """Character edit distance / reference characters, both spelled by ``spelling`` (spaces count)."""
    ref, hyp = list(spelling(reference)), list(spelling(hypothesis))
    if not ref:
        return 0.0 if not hyp else 1.0
    return _edit_distance(ref, hyp) / len(ref)


def greedy_ctc_decode(log_probs: torch.Tensor, length: int) -> str:
    """The best symbol per frame, repeats merged, blanks dropped: (T, C) log-probabilities -> text."""
    best = log_probs[:length].argmax(dim=-1).tolist()
    out, previous = [], BLANK
    for symbol in best:
        if symbol != previous and symbol != BLANK:
            out.append(ALPHABET[symbol - 1])
        previous = symbol
    return "".join(out)


class _ResidualConv(nn.Module):
    """h + W GELU(conv(LN(h))): one non-causal residual block (the probe may read both sides)."""

    def __init__(self, hidden: int, kernel: int, dilation: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel, dilation=dilation, padding=dilation * (kernel // 2))
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.norm(h).transpose(1, 2)).transpose(1, 2)
        return (h + self.dropout(self.out(F.gelu(x)))) * mask


class CTCProbe(nn.Module):
    """Frames (continuous features or token ids) -> per-frame character log-probabilities.

    - ``feature_dim``: inputs are (T, feature_dim) float frames, read by a linear layer after a
      per-dimension standardisation fitted on the training inputs (``set_feature_stats``);
    - ``vocab_sizes``: inputs are (T, S) integer tokens, S streams (e.g. unit, pitch, energy),
      each with its own embedding table; the embeddings are summed.

    Then ``layers`` residual convolution blocks (kernel 5, dilations 1, 2, 4, 1, 2, 4, ...: each
    output frame reads ±28 frames with the defaults, ±1.1 s at 25 Hz) and a linear layer that
    gives every input frame ``upsample`` consecutive output slots over the 27 characters + blank:
    at 25 Hz, fast speech has nearly as many characters as frames, and CTC needs a slot per
    character plus a blank between doubled letters. Convolutions, not a recurrent network: on a
    CPU a GRU's backward pass over a few hundred frames costs seconds per batch.
    """

    def __init__(self, feature_dim: int | None = None, vocab_sizes: list[int] | None = None, hidden: int = 128,
                 layers: int = 6, kernel: int = 5, dropout: float = 0.1, upsample: int = 2):
        super().__init__()
        if (feature_dim is None) == (vocab_sizes is None):
            raise ProbeError("give exactly one of feature_dim (float frames) and vocab_sizes (token ids)")
        self.feature_dim, self.vocab_sizes, self.upsample = feature_dim, list(vocab_sizes or []), int(upsample)
        if self.upsample < 1:
            raise ProbeError(f"upsample must be >= 1, got {upsample}")
        if feature_dim is not None:
            self.register_buffer("mean", torch.zeros(feature_dim))
            self.register_buffer("std", torch.ones(feature_dim))
            self.input = nn.Linear(feature_dim, hidden)
        else:
            self.embeddings = nn.ModuleList(nn.Embedding(v, hidden) for v in self.vocab_sizes)
        self.blocks = nn.ModuleList(_ResidualConv(hidden, kernel, 2 ** (i % 3), dropout) for i in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.output = nn.Linear(hidden, self.upsample * (len(ALPHABET) + 1))

    def set_feature_stats(self, frames: list[np.ndarray]) -> None:
        """Standardise float inputs with the mean and std of the training frames."""
        stacked = torch.as_tensor(np.concatenate(frames, axis=0), dtype=torch.float32)
        self.mean.copy_(stacked.mean(dim=0))
        self.std.copy_(stacked.std(dim=0).clamp(min=1e-5))

    def check(self, x: np.ndarray, index: int = 0) -> np.ndarray:
        """One input sequence, checked: (T, feature_dim) float32 or (T, S) int64 with ids in range."""
        x = np.asarray(x)
        if self.feature_dim is not None:
            if x.ndim != 2 or x.shape[1] != self.feature_dim:
                raise ProbeError(f"input {index} must have shape (T, {self.feature_dim}), got {x.shape}")
            return x.astype(np.float32)
        if x.ndim == 1 and len(self.vocab_sizes) == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != len(self.vocab_sizes):
            raise ProbeError(f"input {index} must have shape (T, {len(self.vocab_sizes)}) token ids, got {x.shape}")
        if x.size and not np.issubdtype(x.dtype, np.integer):
            if not np.array_equal(x, np.round(x)):
                raise ProbeError(f"input {index} holds non-integer token ids")
        x = x.astype(np.int64)
        for s, size in enumerate(self.vocab_sizes):
            if x.size and (x[:, s].min() < 0 or x[:, s].max() >= size):
                raise ProbeError(f"input {index}, stream {s}: ids must be in [0, {size}), "
                                 f"got {x[:, s].min()}..{x[:, s].max()}")
        return x

    def forward(self, batch: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked inputs of any lengths -> ((B, T_max * upsample, C) log-probs, (B,) frame counts).

        Padding frames are zeroed after every block, so an utterance's output does not depend on
        what it is batched with.
        """
        lengths = torch.tensor([len(x) * self.upsample for x in batch])
        padded = nn.utils.rnn.pad_sequence([torch.as_tensor(x) for x in batch], batch_first=True)
        if self.feature_dim is not None:
            h = self.input((padded.float() - self.mean) / self.std)
        else:
            h = sum(emb(padded[..., s]) for s, emb in enumerate(self.embeddings))
        frames = lengths // self.upsample
        mask = (torch.arange(h.shape[1])[None, :] < frames[:, None]).unsqueeze(-1).to(h.dtype)
        h = h * mask
        for block in self.blocks:
            h = block(h, mask)
        logits = self.output(self.norm(h))  # (B, T, upsample * C): each frame's slots, in order
        logits = logits.reshape(h.shape[0], h.shape[1] * self.upsample, len(ALPHABET) + 1)
        return logits.log_softmax(dim=-1), lengths


def ctc_loss(model: CTCProbe, batch: list[np.ndarray], targets: list[np.ndarray]) -> torch.Tensor:
    """Mean CTC loss per target character of one batch (impossible alignments count as zero)."""
    return _ctc_per_character(*model(batch), targets)


def _ctc_per_character(log_probs: torch.Tensor, lengths: torch.Tensor, targets: list[np.ndarray]) -> torch.Tensor:
    flat = torch.as_tensor(np.concatenate(targets))
    target_lengths = torch.tensor([len(t) for t in targets])
    loss = F.ctc_loss(log_probs.transpose(0, 1), flat, lengths, target_lengths, blank=BLANK,
                      reduction="sum", zero_infinity=True)
    return loss / target_lengths.sum().clamp(min=1)


@dataclass
class ProbeResult:
    """A trained probe's held-out figures and its training curve."""

    cer: float  # character errors / reference characters over all held-out utterances
    wer: float  # mean word error rate of the greedy spellings (no language model: high)
    transcripts: list[str]
    history: dict = field(default_factory=dict)  # step, train loss (per character), held-out loss


@torch.no_grad()
def evaluate_probe(model: CTCProbe, inputs: list[np.ndarray], texts: list[str],
                   batch_size: int = 64) -> tuple[float, float, list[str], float]:
    """CER (pooled), mean WER, greedy transcripts and mean CTC loss per character on (inputs, texts)."""
    from .asr import word_error_rate

    model.eval()
    transcripts, losses, chars = [], 0.0, 0
    for start in range(0, len(inputs), batch_size):
        batch = [model.check(x, start + i) for i, x in enumerate(inputs[start : start + batch_size])]
        targets = [char_ids(t) for t in texts[start : start + batch_size]]
        log_probs, lengths = model(batch)
        n = sum(len(t) for t in targets)
        losses += float(_ctc_per_character(log_probs, lengths, targets)) * n
        chars += n
        transcripts += [greedy_ctc_decode(lp, int(n_frames)) for lp, n_frames in zip(log_probs, lengths)]
    errors = sum(_edit_distance(list(spelling(t)), list(h)) for t, h in zip(texts, transcripts))
    total = sum(len(spelling(t)) for t in texts)
    wer = float(np.mean([word_error_rate(t, h) for t, h in zip(texts, transcripts)]))
    return errors / max(total, 1), wer, transcripts, losses / max(chars, 1)


def fit_content_probe(model: CTCProbe, train_inputs: list[np.ndarray], train_texts: list[str],
                      test_inputs: list[np.ndarray], test_texts: list[str], steps: int = 600,
                      batch_size: int = 32, lr: float = 2e-3, seed: int = 0, eval_every: int = 200,
                      progress: bool = False) -> ProbeResult:
    """Train ``model`` with CTC on the training pairs, then measure it on the held-out pairs.

    Utterances whose spelling is empty are left out. Adam with a cosine decay; batches are drawn
    with a seeded generator, so the same inputs and seed give the same probe. The held-out loss is
    recorded before training and every ``eval_every`` steps (the curve shows whether the budget was enough).
    """
    from tqdm.auto import tqdm

    pairs = [(model.check(x, i), char_ids(t)) for i, (x, t) in enumerate(zip(train_inputs, train_texts))]
    pairs = [(x, t) for x, t in pairs if len(t) and len(x)]
    if not pairs:
        raise ProbeError("no training utterance with both frames and a spelled transcript")
    if len(test_inputs) != len(test_texts) or not test_inputs:
        raise ProbeError(f"need held-out inputs and texts of equal, non-zero length, got {len(test_inputs)} "
                         f"and {len(test_texts)}")
    if model.feature_dim is not None:
        model.set_feature_stats([x for x, _ in pairs])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history: dict = {"step": [], "loss": [], "eval_step": [], "eval_loss": []}
    history["eval_step"].append(0)
    history["eval_loss"].append(evaluate_probe(model, test_inputs, test_texts)[3])
    for step in tqdm(range(steps), desc="content probe", disable=not progress):
        model.train()
        chosen = rng.choice(len(pairs), size=min(batch_size, len(pairs)), replace=False)
        loss = ctc_loss(model, [pairs[i][0] for i in chosen], [pairs[i][1] for i in chosen])
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history["step"].append(step + 1)
        history["loss"].append(float(loss.detach()))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            history["eval_step"].append(step + 1)
            history["eval_loss"].append(evaluate_probe(model, test_inputs, test_texts)[3])
    cer, wer, transcripts, _ = evaluate_probe(model, test_inputs, test_texts)
    return ProbeResult(cer=cer, wer=wer, transcripts=transcripts, history=history)
