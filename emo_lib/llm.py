"""Stage 1: the speech LLM. Speech embeddings spliced into a chat prompt, LoRA, an emotion head.

Emotion Omni's first stage teaches an instruction LLM to *listen*: the fused speech embeddings
of the user's query (``encoders.SpeechProjector``, 10 Hz, LLM width) replace a placeholder in
the backbone's own chat template, and the model is trained to write the empathetic reply. On
top of the LLM's last hidden states an *emotion head* emits one emotion vector per response
token: the affective plan that stage 2 turns into a voice. Training targets for that head are
the DTW-aligned token trajectories of notebook 03. The loss (the paper's Eq. 3)::

    L = CE(next token) + lambda * ( MSE(e_hat, e) + (1 - cos(e_hat, e)) )

averaged over response tokens. Only the LoRA matrices, the projector (both adapters and the
projection) and the emotion head learn; both speech encoders and the LLM's own weights stay
frozen.

The speech adapter is chosen by name (``Stage1Config.adapter``, see ``emo_lib.adapters``): the
paper's ``fused`` projector by default, or the public code's ``interleaved`` streams, the
``semantic_only`` ablation, or the Dual-Information SLM's ``dual_info`` adapters (with
equivalence replacement during training). ``Stage1Config.emotion_target = "utterance_mean"``
trains the head on each reply's mean target vector (the public code's utterance-level target);
held-out evaluation always compares with the DTW token trajectories.

Token bookkeeping, the one thing that must be exact: the response is tokenized on its own with
``align.llm_tokenize`` (no special tokens), exactly as notebook 03 did when it averaged emotion
frames per token, so target vector ``k`` belongs to response token ``k``. The sequence is::

    [prefix ids] [speech frames] [suffix ids] [response ids] [<|im_end|>]
     system + "<|im_start|>user\\n"     "<|im_end|>\\n<|im_start|>assistant\\n"

The emotion of response token ``k`` is read from the hidden state at the position where token
``k`` is *input* (one step after it was predicted), so during generation each token's emotion
is known as soon as the token has been fed back, and the head is causal: streaming works.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .align import llm_tokenize
from .adapters import ADAPTERS, build_adapter

SPEECH_PLACEHOLDER = "<speech>"
# Short on purpose: every prompt token costs compute at every training step. The words say what
# the model is asked to do; the emotion must come from the speech, never from the text.
STAGE1_SYSTEM_PROMPT = "You are a caring friend. Listen to how the person sounds and reply with one or two short, warm sentences."
# The auxiliary task's instruction (``Stage1Config.transcribe_prob``): write down the words heard.
TRANSCRIBE_SYSTEM_PROMPT = "Write down exactly what the person said."
TASKS = ("reply", "transcribe")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGE1_NOTEBOOK = "notebooks/04_stage1.ipynb"
STAGE1_CHECKPOINT_KIND = "stage1"
EMOTION_TARGETS = ("dtw", "utterance_mean")


@dataclass
class Stage1Config:
    """Everything that fixes the shapes of a stage-1 model; saved in its checkpoints."""

    llm: str = "packaged:smollm2-135m-instruct"
    semantic_dim: int = 384
    emotion_dim: int = 256
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple = LORA_TARGETS
    head_width: int = 256
    head_layers: int = 2
    head_heads: int = 4
    head_dropout: float = 0.1
    emotion_weight: float = 1.0  # lambda of Eq. 3
    max_speech_s: float = 12.0  # longer queries are truncated or rejected (over_long)
    over_long: str = "truncate"  # "truncate" (keep the first max_speech_s) or "reject" (ValueError)
    system_prompt: str = STAGE1_SYSTEM_PROMPT
    adapter: str = "fused"  # speech adapter, a name registered in emo_lib.adapters
    emotion_target: str = "dtw"  # "dtw" (token trajectories) or "utterance_mean" (their mean, repeated)
    soft_prompt_length: int = 4  # dual_info: paralinguistic soft-prompt vectors
    replacement_prob: float = 0.0  # dual_info: equivalence-replacement probability per training example
    # Share of training examples turned into the auxiliary transcription task (the kit's addition,
    # not the paper's: see ``SpeechLLM.transcription_draws``); 0 is the paper's single task.
    transcribe_prob: float = 0.0
    transcribe_prompt: str = TRANSCRIBE_SYSTEM_PROMPT

    def __post_init__(self):
        if self.over_long not in ("truncate", "reject"):
            raise ValueError(f"over_long must be 'truncate' or 'reject', got {self.over_long!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {sorted(ADAPTERS)}, got {self.adapter!r} (stage1.adapter in the preset)")
        if self.emotion_target not in EMOTION_TARGETS:
            raise ValueError(f"emotion_target must be one of {list(EMOTION_TARGETS)}, got {self.emotion_target!r} "
                             "(stage1.emotion_target in the preset)")
        if not 0.0 <= self.replacement_prob <= 1.0:
            raise ValueError(f"replacement_prob must lie in [0, 1], got {self.replacement_prob} (stage1.replacement_prob)")
        if not 0.0 <= self.transcribe_prob < 1.0:
            raise ValueError(f"transcribe_prob must lie in [0, 1), got {self.transcribe_prob} (stage1.transcribe_prob)")
        self.lora_targets = tuple(self.lora_targets)


# ---------------------------------------------------------------------------------------------
# The emotion head
# ---------------------------------------------------------------------------------------------
def causal_mask(n: int, device=None) -> torch.Tensor:
    """(n, n) bool mask, True where attention is NOT allowed (a position sees itself and the past)."""
    return torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)


class EmotionHead(nn.Module):
    """LLM hidden states of the response tokens -> one emotion vector per token.

    Linear(llm_dim -> width), a small *causal* Transformer encoder (pre-norm, ``layers`` blocks,
    ``heads`` heads) so that a token's emotion may depend on the reply so far but never on words
    not yet written (the paper's head is a Transformer encoder + MLP; causality is the kit's
    choice, so that the trajectory can stream), then an MLP to ``emotion_dim``.
    (B, N, llm_dim) + (B, N) mask -> (B, N, emotion_dim).
    """

    def __init__(self, llm_dim: int, emotion_dim: int, width: int = 256, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(llm_dim, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, emotion_dim))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.inp(hidden)
        x = self.encoder(x, mask=causal_mask(x.shape[1], x.device), src_key_padding_mask=~mask, is_causal=True)
        return self.mlp(x) * mask[..., None]


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def emotion_losses(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE, 1 - cosine), each averaged over the valid tokens; zero for identical vectors.

    MSE is the mean squared difference per dimension; 1 - cos ignores length and measures the
    direction. Tokens without a target (mask False) contribute nothing.
    """
    m = mask.to(predicted.dtype)
    count = m.sum().clamp_min(1.0)
    mse = ((predicted - target) ** 2).mean(-1)
    cosine = F.cosine_similarity(predicted, target, dim=-1, eps=1e-8)
    return (mse * m).sum() / count, ((1.0 - cosine) * m).sum() / count


def stage1_loss(ce: torch.Tensor, mse: torch.Tensor, one_minus_cos: torch.Tensor, emotion_weight: float) -> torch.Tensor:
    """Eq. 3: CE + lambda * (MSE + (1 - cos))."""
    return ce + emotion_weight * (mse + one_minus_cos)


# ---------------------------------------------------------------------------------------------
# Prompt splicing
# ---------------------------------------------------------------------------------------------
def prompt_pieces(tokenizer, system_prompt: str = STAGE1_SYSTEM_PROMPT) -> tuple[list[int], list[int]]:
    """Token ids before and after the speech in the backbone's own chat template.

    The template is rendered with the user's message set to ``SPEECH_PLACEHOLDER`` and the
    assistant turn opened (``add_generation_prompt``); the text is split at the placeholder and
    each side tokenized without adding special tokens (the template already wrote them).
    """
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": SPEECH_PLACEHOLDER}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(SPEECH_PLACEHOLDER) != 1:
        raise ValueError(f"the chat template must render the placeholder {SPEECH_PLACEHOLDER!r} exactly once")
    before, after = text.split(SPEECH_PLACEHOLDER)
    encode = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    return encode(before), encode(after)


def end_of_turn_id(tokenizer) -> int:
    """The token that closes the assistant's turn (``<|im_end|>`` for ChatML templates)."""
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token, int) and token != tokenizer.unk_token_id and token is not None:
            return token
    return tokenizer.eos_token_id


def response_token_ids(tokenizer, text: str) -> list[int]:
    """Response ids exactly as notebook 03 tokenized them (so the k-th target fits the k-th token)."""
    return llm_tokenize(tokenizer, text)[0]


@dataclass
class Stage1Example:
    """One training or evaluation example: query frames at 50 Hz, response ids and targets."""

    pair_id: str
    semantic: np.ndarray  # (T50, semantic_dim)
    emotion: np.ndarray  # (T50, emotion_dim)
    response_ids: list[int] = field(default_factory=list)
    trajectory: np.ndarray | None = None  # (len(response_ids), emotion_dim) or None
    query_ids: list[int] | None = None  # token ids of the query's transcript (dual_info's equivalence replacement)
    transcript_ids: list[int] | None = None  # token ids of the query's scripted text (the transcription task's answer)
    task: str = "reply"  # "reply" (the paper's task) or "transcribe" (the auxiliary task, training only)


def limit_speech(example: Stage1Example, max_speech_s: float, policy: str) -> tuple[Stage1Example, bool]:
    """Apply the over-long rule; returns the example and whether it was cut.

    ``truncate`` keeps the first ``max_speech_s`` of both streams (the query's opening usually
    carries its point); ``reject`` raises a ValueError naming the pair and both durations.
    ``emotion`` may be None (an adapter that does not use the emotion stream).
    """
    limit = int(round(max_speech_s * 50))
    if example.emotion is not None and len(example.semantic) != len(example.emotion):
        raise ValueError(f"{example.pair_id}: semantic ({len(example.semantic)}) and emotion ({len(example.emotion)}) "
                         "frames must share the 50 Hz clock")
    if len(example.semantic) <= limit:
        return example, False
    if policy == "reject":
        raise ValueError(f"{example.pair_id}: query speech of {len(example.semantic) / 50:.1f} s is longer than "
                         f"max_speech_s = {max_speech_s} s (policy 'reject'; use 'truncate' to keep its start)")
    emotion = None if example.emotion is None else example.emotion[:limit]
    return dataclasses.replace(example, semantic=example.semantic[:limit], emotion=emotion), True


@dataclass
class SplicedBatch:
    """A padded batch of spliced sequences (right padding for training)."""

    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L): next-token targets in HF convention (-100 outside the response)
    response_positions: torch.Tensor  # (B, N) positions where response token k is input; -1 = padding
    response_mask: torch.Tensor  # (B, N) bool
    target_mask: torch.Tensor  # (B, N) bool: response token has an emotion target
    targets: torch.Tensor  # (B, N, E) DTW trajectories (zeros where no target): what evaluation compares with
    speech_frames: list[int]  # speech positions per example (10 Hz frames for the fused adapter)
    loss_targets: torch.Tensor  # (B, N, E) what the emotion loss fits: targets, or their per-example mean (utterance_mean)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def penalize_repeats(logits: torch.Tensor, written: list[int], penalty: float) -> None:
    """CTRL's repetition penalty, in place on one row of logits: tokens already written are made
    less likely (positive logits divided by ``penalty``, negative ones multiplied by it)."""
    if penalty == 1.0 or not written:
        return
    seen = torch.tensor(sorted(set(written)), device=logits.device)
    values = logits[seen]
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)


class SpeechLLM(nn.Module):
    """Projector + LoRA-wrapped LLM + emotion head. Build with ``build_speech_llm``."""

    def __init__(self, llm, tokenizer, config: Stage1Config):
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        hidden = llm.config.hidden_size
        self.projector = build_adapter(config.adapter, config.semantic_dim, config.emotion_dim, hidden,
                                       soft_prompt_length=config.soft_prompt_length)
        self.head = EmotionHead(hidden, config.emotion_dim, config.head_width, config.head_layers,
                                config.head_heads, config.head_dropout)
        prefix, suffix = prompt_pieces(tokenizer, config.system_prompt)
        # Emotion targets are standardized with the training set's per-dimension mean and
        # standard deviation (``set_target_stats``): emotion frames share a large common
        # direction (a constant vector already scores cosine ~0.97), so on raw vectors the loss
        # would mostly reward that direction. The head predicts standardized vectors; outputs
        # are mapped back to the emotion encoder's space.
        self.register_buffer("target_mean", torch.zeros(config.emotion_dim))
        self.register_buffer("target_std", torch.ones(config.emotion_dim))
        self.register_buffer("prefix_ids", torch.tensor(prefix), persistent=False)
        self.register_buffer("suffix_ids", torch.tensor(suffix), persistent=False)
        prefix, suffix = prompt_pieces(tokenizer, config.transcribe_prompt)
        self.register_buffer("transcribe_prefix_ids", torch.tensor(prefix), persistent=False)
        self.register_buffer("transcribe_suffix_ids", torch.tensor(suffix), persistent=False)
        self.end_id = end_of_turn_id(tokenizer)

    # -- inference speed: LoRA folded into the frozen weights -----------------------------------
    @property
    def lora_merged(self) -> bool:
        """Are LoRA updates folded into the weights now? Read from peft's layers: peft itself unmerges
        them inside ``llm.disable_adapter()`` (the text cascade's base backbone)."""
        return any(bool(m.merged_adapters) for m in self.llm.modules() if hasattr(m, "merged_adapters"))

    def merge_lora(self) -> "SpeechLLM":
        """Fold every LoRA update into its frozen weight, W <- W + (alpha / r) B A, and switch to eval mode.

        The function is the same (up to float rounding), but each adapted projection costs one
        matrix product instead of three plus a dropout module: on 2 CPU cores stage 1's share of
        streamed speech fell by about a fifth (docs/findings.md, "Benchmarks, as measured"). Inference only:
        ``train()`` unmerges first, so training always updates the factors the forward pass uses.
        """
        self.eval()
        if not self.lora_merged:
            self.llm.merge_adapter()
        return self

    def unmerge_lora(self) -> None:
        """Undo ``merge_lora`` (W <- W - (alpha / r) B A); a no-op when nothing is merged."""
        if self.lora_merged:
            self.llm.unmerge_adapter()

    def train(self, mode: bool = True) -> "SpeechLLM":
        if mode:
            self.unmerge_lora()
        return super().train(mode)

    def set_target_stats(self, examples: list[Stage1Example]) -> None:
        """Per-dimension mean and standard deviation of the training trajectories (floor 1e-3)."""
        vectors = np.concatenate([e.trajectory for e in examples if e.trajectory is not None])
        self.target_mean.copy_(torch.as_tensor(vectors.mean(0), dtype=torch.float32))
        self.target_std.copy_(torch.as_tensor(np.maximum(vectors.std(0), 1e-3), dtype=torch.float32))

    def emotion_vectors(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Emotion vectors in the emotion encoder's space from response hidden states."""
        return (self.head(hidden.float(), mask) * self.target_std + self.target_mean) * mask[..., None]

    # -- pieces -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.prefix_ids.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def replacement_embeddings(self, examples: list[Stage1Example]) -> list[torch.Tensor | None] | None:
        """Equivalence replacement (dual_info): per example None or the (L, H) embeddings of its transcript.

        Only for adapters that support it and ``replacement_prob > 0``. Each example with
        (non-empty) ``query_ids`` is replaced with probability ``replacement_prob``; the draws come from
        torch's global CPU RNG (seeded by the session, saved and restored by
        ``train.train_loop``'s checkpoints), so a resumed run draws what an uninterrupted one would.
        Returns None when nothing is replaced.
        """
        if not self.projector.supports_replacement or self.config.replacement_prob <= 0:
            return None
        draws = torch.rand(len(examples))
        chosen = [bool(e.query_ids) and bool(draws[i] < self.config.replacement_prob) for i, e in enumerate(examples)]
        if not any(chosen):
            return None
        return [self.embed_tokens(torch.tensor(e.query_ids, dtype=torch.long, device=self.device)) if c else None
                for e, c in zip(examples, chosen)]

    def transcription_draws(self, examples: list[Stage1Example]) -> list[Stage1Example]:
        """The auxiliary transcription task: some training examples ask for the query's words instead of a reply.

        Why (the kit's addition, not the paper's): with a few thousand pairs and one pass over
        them, the reply loss alone did not teach the adapter to carry *words* into the LLM. The
        replies here depend on the query's emotion far more than on its wording, so the cheapest
        way to lower the loss is to hear the emotion and answer with a stock phrase: on the cpu
        preset the reply loss was the same whether the model heard the true query or another
        query of the same emotion (``listening_test``; docs/findings.md, notebook 04). Speech LLMs
        commonly align their adapter with transcription first (SALMONN, Qwen-Audio); here it is
        mixed into stage 1: with probability ``transcribe_prob`` an example (with
        ``transcript_ids``) becomes ``[TRANSCRIBE_SYSTEM_PROMPT] [speech] -> its scripted text``,
        with no emotion target (no emotion loss). Evaluation and generation always use the reply
        task. Measured on the cpu preset (0.5, 240 steps): not enough either; the transcripts were
        invented sentences of the right emotion (WER 1.05), so the default stays 0. Draws come from
        torch's global CPU RNG, so a resumed run draws what an uninterrupted one would.
        """
        if self.config.transcribe_prob <= 0:
            return examples
        draws = torch.rand(len(examples))
        return [dataclasses.replace(e, response_ids=list(e.transcript_ids), trajectory=None, task="transcribe")
                if e.transcript_ids and bool(draws[i] < self.config.transcribe_prob) else e
                for i, e in enumerate(examples)]

    def speech_embeddings(self, examples: list[Stage1Example], replacement: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T', H) adapter output and its (B, T') mask, with the over-long rule applied.

        T' is ceil(T50 / 5) for the fused and semantic_only adapters, twice that for interleaved,
        K + ceil(T50 / 5) for dual_info. An adapter that does not use the emotion stream ignores
        the examples' emotion frames (they may be missing or of any width). ``replacement``
        allows dual_info's equivalence replacement (``forward`` sets it in training mode only).
        """
        uses_emotion = self.projector.uses_emotion
        if not uses_emotion:
            examples = [dataclasses.replace(e, emotion=None) for e in examples]
        limited = [limit_speech(e, self.config.max_speech_s, self.config.over_long)[0] for e in examples]
        for e in limited:
            if len(e.semantic) == 0:
                raise ValueError(f"{e.pair_id}: the query has no speech frames (empty audio)")
        t50 = max(len(e.semantic) for e in limited)
        dev = self.device
        semantic = torch.zeros(len(limited), t50, self.config.semantic_dim, device=dev)
        emotion = torch.zeros(len(limited), t50, self.config.emotion_dim, device=dev)
        mask = torch.zeros(len(limited), t50, dtype=torch.bool, device=dev)
        for i, e in enumerate(limited):
            emotion_width = e.emotion.shape[1] if uses_emotion else self.config.emotion_dim
            if e.semantic.shape[1] != self.config.semantic_dim or emotion_width != self.config.emotion_dim:
                raise ValueError(f"{e.pair_id}: frames of width {e.semantic.shape[1]} + {emotion_width}, the "
                                 f"model expects {self.config.semantic_dim} + {self.config.emotion_dim}")
            semantic[i, : len(e.semantic)] = torch.as_tensor(np.asarray(e.semantic, dtype=np.float32), device=dev)
            if uses_emotion:
                emotion[i, : len(e.emotion)] = torch.as_tensor(np.asarray(e.emotion, dtype=np.float32), device=dev)
            mask[i, : len(e.semantic)] = True
        swap = self.replacement_embeddings(limited) if replacement else None
        return self.projector(semantic, emotion, mask, replace=swap)

    def splice(self, examples: list[Stage1Example], with_response: bool = True, replacement: bool = False) -> SplicedBatch:
        """Build the padded input embeddings, masks, labels and emotion targets of a batch.

        With ``with_response`` the reply and ``<|im_end|>`` follow the prompt (teacher forcing),
        right-padded; without it the batch holds prompts only, LEFT-padded so that generation
        continues every row from its last real position. ``replacement`` allows dual_info's
        equivalence replacement (training only).

        ``targets`` are always the DTW token trajectories; ``loss_targets`` are what the emotion
        loss fits: the same, or with ``emotion_target = "utterance_mean"`` each example's mean
        target vector repeated on every response token (the public code's utterance-level target).
        """
        speech, speech_mask = self.speech_embeddings(examples, replacement=replacement)
        prompts = {"reply": (self.embed_tokens(self.prefix_ids), self.embed_tokens(self.suffix_ids))}
        if any(e.task == "transcribe" for e in examples):
            prompts["transcribe"] = (self.embed_tokens(self.transcribe_prefix_ids), self.embed_tokens(self.transcribe_suffix_ids))
        rows, label_rows, positions, n_frames = [], [], [], []
        for i, e in enumerate(examples):
            if e.task not in prompts:
                raise ValueError(f"{e.pair_id}: unknown task {e.task!r}; known: {list(TASKS)}")
            prefix, suffix = prompts[e.task]
            t10 = int(speech_mask[i].sum())
            n_frames.append(t10)
            parts = [prefix, speech[i, :t10], suffix]
            labels = [-100] * (len(prefix) + t10 + len(suffix))
            start = sum(len(p) for p in parts)
            if with_response:
                ids = list(e.response_ids) + [self.end_id]
                parts.append(self.embed_tokens(torch.tensor(ids, device=self.device)))
                # HF shifts labels inside the model: label at position p is the token at p.
                # The last prompt position predicts the first response token, so labels on the
                # response positions are the response ids themselves.
                labels += ids
            rows.append(torch.cat(parts, 0))
            label_rows.append(labels)
            positions.append(list(range(start, start + len(e.response_ids))) if with_response else [])
        length = max(len(r) for r in rows)
        b, h = len(rows), rows[0].shape[1]
        embeds = rows[0].new_zeros(b, length, h)
        attention = torch.zeros(b, length, dtype=torch.long, device=self.device)
        labels = torch.full((b, length), -100, dtype=torch.long, device=self.device)
        n_resp = max([len(p) for p in positions] + [1])
        pos = torch.full((b, n_resp), -1, dtype=torch.long, device=self.device)
        targets = torch.zeros(b, n_resp, self.config.emotion_dim, device=self.device)
        target_mask = torch.zeros(b, n_resp, dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            n = len(row)
            offset = 0 if with_response else length - n  # left padding for generation
            embeds[i, offset : offset + n] = row
            attention[i, offset : offset + n] = 1
            labels[i, offset : offset + n] = torch.tensor(label_rows[i], device=self.device)
            if positions[i]:
                pos[i, : len(positions[i])] = torch.tensor(positions[i], device=self.device)
                trajectory = examples[i].trajectory
                if trajectory is not None:
                    if len(trajectory) != len(examples[i].response_ids):
                        raise ValueError(f"{examples[i].pair_id}: {len(trajectory)} trajectory vectors for "
                                         f"{len(examples[i].response_ids)} response tokens; rerun notebook 03")
                    targets[i, : len(trajectory)] = torch.as_tensor(np.asarray(trajectory, dtype=np.float32), device=self.device)
                    target_mask[i, : len(trajectory)] = True
        loss_targets = targets
        if self.config.emotion_target == "utterance_mean":
            m = target_mask[..., None].to(targets.dtype)
            mean = (targets * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
            loss_targets = mean * m
        return SplicedBatch(embeds, attention, labels, pos, pos >= 0, target_mask, targets, n_frames, loss_targets)

    # -- training forward ----------------------------------------------------------------------
    def forward(self, examples: list[Stage1Example]) -> dict:
        """Teacher-forced forward: loss terms, the response hidden states and emotion vectors.

        The loss fits ``batch.loss_targets`` (see ``splice``); the returned ``targets`` are the
        DTW trajectories whatever ``emotion_target`` says, so evaluation reads the same targets
        for every arm. In training mode dual_info's equivalence replacement may apply.
        """
        if self.training:
            examples = self.transcription_draws(examples)
        batch = self.splice(examples, with_response=True, replacement=self.training)
        causal_lm = self.llm.get_base_model()  # the LoRA-injected LlamaForCausalLM (or Qwen2…)
        last = causal_lm.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                               use_cache=False).last_hidden_state
        # The vocabulary projection (576 x 49 152 for SmolLM2) is a fifth of the compute per
        # position; only positions that predict a reply token need it, not the prompt's.
        predicts = batch.labels[:, 1:] != -100
        logits = causal_lm.lm_head(last[:, :-1][predicts]).float()
        ce = F.cross_entropy(logits, batch.labels[:, 1:][predicts])
        gather = batch.response_positions.clamp_min(0)
        response_hidden = torch.gather(last, 1, gather[..., None].expand(-1, -1, last.shape[-1]))
        standardized = self.head(response_hidden.float(), batch.response_mask)
        target = (batch.loss_targets - self.target_mean) / self.target_std
        mse, cos = emotion_losses(standardized, target, batch.target_mask)
        loss = stage1_loss(ce, mse, cos, self.config.emotion_weight)
        predicted = (standardized * self.target_std + self.target_mean) * batch.response_mask[..., None]
        return {"loss": loss, "ce": ce, "mse": mse, "one_minus_cos": cos, "emotion": predicted,
                "hidden": response_hidden, "response_mask": batch.response_mask, "target_mask": batch.target_mask,
                "targets": batch.targets}

    # -- inference -----------------------------------------------------------------------------
    def _prefill(self, examples: list[Stage1Example]) -> dict:
        """Run the spliced prompts (no response) through the LLM; the decoding state of ``generate``."""
        batch = self.splice(examples, with_response=False)
        attention = batch.attention_mask
        position = (attention.cumsum(1) - 1).clamp_min(0)
        out = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=attention, position_ids=position, use_cache=True)
        return {"attention": attention, "cache": out.past_key_values, "logits": out.logits[:, -1].float(),
                "next_position": position[:, -1] + 1}

    def _feed(self, state: dict, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,) through the KV cache; updates ``state``, returns the last hidden states (B, H)."""
        b = len(token)
        state["attention"] = torch.cat([state["attention"],
                                        torch.ones(b, 1, dtype=state["attention"].dtype, device=self.device)], 1)
        out = self.llm(inputs_embeds=self.embed_tokens(token[:, None]), attention_mask=state["attention"],
                       position_ids=state["next_position"][:, None], past_key_values=state["cache"], use_cache=True,
                       output_hidden_states=True)
        state["cache"] = out.past_key_values
        state["logits"] = out.logits[:, -1].float()
        state["next_position"] = state["next_position"] + 1
        return out.hidden_states[-1][:, -1].float()

    @torch.inference_mode()
    def generate(self, examples: list[Stage1Example], max_new_tokens: int = 40, repetition_penalty: float = 1.1) -> list[dict]:
        """Greedy replies from speech alone, with each token's hidden state and emotion vector.

        A hand-written loop over the KV cache (rather than ``generate``) so that every step
        hands out its token, its last-layer hidden state and its emotion vector: what stage 2
        and the streaming demo consume. ``repetition_penalty`` divides the logits
        of tokens already written (CTRL's rule): a 135M model otherwise loops on phrases.
        Returns per example: ``text``, ``token_ids``, ``hidden`` (N, H) and ``emotion`` (N, E).
        """
        state = self._prefill(examples)
        b = len(examples)
        written = [[] for _ in range(b)]
        hidden = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            for i in range(b):
                penalize_repeats(state["logits"][i], written[i], repetition_penalty)
            token = state["logits"].argmax(-1)
            token = torch.where(done, torch.full_like(token, self.end_id), token)
            finished_now = token == self.end_id
            last = self._feed(state, token)
            for i in range(b):
                if not done[i] and not finished_now[i]:
                    written[i].append(int(token[i]))
                    hidden[i].append(last[i])
            done = done | finished_now
            if bool(done.all()):
                break
        results = []
        for i in range(b):
            h = torch.stack(hidden[i]) if hidden[i] else torch.zeros(0, self.llm.config.hidden_size, device=self.device)
            emotion = self.emotion_vectors(h[None], torch.ones(1, len(h), dtype=torch.bool, device=self.device))[0] \
                if len(h) else torch.zeros(0, self.config.emotion_dim, device=self.device)
            results.append({"text": self.tokenizer.decode(written[i], skip_special_tokens=True).strip(),
                            "token_ids": written[i], "hidden": h.cpu().numpy(), "emotion": emotion.cpu().numpy()})
        return results

    @torch.inference_mode()
    def stream_reply(self, example: Stage1Example, max_new_tokens: int = 40, repetition_penalty: float = 1.1):
        """``generate`` for ONE example, as a generator: one dict per reply token, as soon as it exists.

        Yields ``{"token_id", "text_piece", "hidden" (H,), "emotion" (E,)}`` (numpy float32) and
        stops at ``<|im_end|>`` or after ``max_new_tokens`` (an immediate ``<|im_end|>`` yields
        nothing). The steps are ``generate``'s for a batch of one: the same prefill, the same
        greedy choice with the same repetition penalty, the same KV-cache call that feeds the
        token back and returns its hidden state. So the tokens and hidden states equal
        ``generate``'s.

        The emotion vector of token ``i`` comes from the emotion head over the hidden states of
        tokens ``0..i``. The head is causal (token ``i`` never attends to later tokens), so this
        vector is the ``i``-th row of what ``generate`` computes over the whole reply (equal up
        to float rounding). Re-running the head on the prefix costs O(i) per token, O(N^2) per
        reply; for a 2-layer head and N <= 100 tokens that is negligible next to the LLM step.

        ``text_piece`` is the new text of the token: the decoded reply so far minus the text
        already handed out. A token that ends inside a multi-byte character (decoded as U+FFFD)
        gives ``""`` and its bytes appear with the next token; the pieces concatenate to the
        decoded reply (``generate``'s ``text`` before ``strip``).
        """
        state = self._prefill([example])
        written: list[int] = []
        hidden: list[torch.Tensor] = []
        shown = ""  # the text handed out so far
        for _ in range(max_new_tokens):
            penalize_repeats(state["logits"][0], written, repetition_penalty)
            token = state["logits"].argmax(-1)
            if int(token[0]) == self.end_id:
                return
            last = self._feed(state, token)
            written.append(int(token[0]))
            hidden.append(last[0])
            h = torch.stack(hidden)[None]
            emotion = self.emotion_vectors(h, torch.ones(1, len(hidden), dtype=torch.bool, device=self.device))[0, -1]
            text = self.tokenizer.decode(written, skip_special_tokens=True)
            piece = ""
            if not text.endswith("\ufffd"):  # wait for the rest of a split multi-byte character
                # byte-level BPE decodes prefix by prefix, so ``shown`` is a prefix of ``text``
                piece, shown = text[len(shown):], text
            yield {"token_id": written[-1], "text_piece": piece, "hidden": hidden[-1].cpu().numpy(),
                   "emotion": emotion.cpu().numpy()}

    # -- parameters and state ------------------------------------------------------------------
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group: ``lora`` and ``adapters`` (projector + emotion head)."""
        lora = [p for n, p in self.llm.named_parameters() if p.requires_grad and "lora_" in n]
        adapters = list(self.projector.parameters()) + list(self.head.parameters())
        return {"lora": lora, "adapters": adapters}

    def trainable_state(self) -> dict:
        """What a checkpoint must hold: LoRA tensors, projector and head (the frozen LLM is not saved)."""
        lora = {n: p.detach().cpu().clone() for n, p in self.llm.named_parameters() if "lora_" in n}
        return {"lora": lora, "projector": self.projector.state_dict(), "head": self.head.state_dict(),
                "target_mean": self.target_mean.cpu().clone(), "target_std": self.target_std.cpu().clone()}

    def load_trainable_state(self, state: dict) -> None:
        merged = self.lora_merged
        self.unmerge_lora()  # the merged weights hold the old factors: take them out before replacing them
        named = dict(self.llm.named_parameters())
        missing = [n for n in named if "lora_" in n and n not in state["lora"]]
        unexpected = [n for n in state["lora"] if n not in named]
        if missing or unexpected:
            raise ValueError(f"LoRA tensors do not match this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for n, value in state["lora"].items():
                if named[n].shape != value.shape:
                    raise ValueError(f"LoRA tensor {n} has shape {tuple(value.shape)} in the checkpoint but "
                                     f"{tuple(named[n].shape)} in this model (a different LoRA rank?)")
                named[n].copy_(value)
        self.projector.load_state_dict(state["projector"])
        self.head.load_state_dict(state["head"])
        self.target_mean.copy_(state["target_mean"])
        self.target_std.copy_(state["target_std"])
        if merged:
            self.merge_lora()


def apply_lora(llm, config: Stage1Config):
    """Wrap ``llm`` with peft LoRA adapters on ``config.lora_targets``; every other weight is frozen."""
    from peft import LoraConfig, get_peft_model

    for p in llm.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(llm, lora)


def build_speech_llm(config: Stage1Config, llm=None, tokenizer=None, device: str = "cpu") -> SpeechLLM:
    """The stage-1 model: backbone from ``config.llm`` (or the given ``llm``/``tokenizer``), LoRA, projector, head."""
    if llm is None or tokenizer is None:
        from .pretrained import load_llm

        llm, tokenizer = load_llm(config.llm, device="cpu")
    model = SpeechLLM(apply_lora(llm, config), tokenizer, config)
    return model.to(device)


def count_trainable(model: SpeechLLM) -> dict:
    """Trainable and total parameters, by group (the notebook prints this table)."""
    groups = model.parameter_groups()
    total = sum(p.numel() for p in model.parameters())
    counts = {name: sum(p.numel() for p in params) for name, params in groups.items()}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**counts, "trainable": trainable, "total": total, "trainable_share": trainable / total}


def checkpoint_payload(model: SpeechLLM, extra: dict | None = None) -> dict:
    return {"kind": STAGE1_CHECKPOINT_KIND, "config": asdict(model.config), "state": model.trainable_state(), **(extra or {})}


OLD_CHECKPOINT_DEFAULTS = {"adapter": "fused", "emotion_target": "dtw", "soft_prompt_length": 4}


def check_checkpoint_config(saved: dict, config: Stage1Config, path) -> None:
    """Refuse a checkpoint whose shapes or objective differ from ``config`` (e.g. another LoRA rank), naming both.

    Also compared: ``adapter`` and ``emotion_target`` (resuming one arm from another arm's
    checkpoint would mix two models or two objectives) and, for dual_info, ``soft_prompt_length``.
    Keys a checkpoint from before they existed lacks take the value those checkpoints were
    trained with (``OLD_CHECKPOINT_DEFAULTS``: the fused adapter, DTW targets).
    """
    from .train import CheckpointError

    keys = ["lora_r", "lora_targets", "emotion_dim", "semantic_dim", "head_width", "head_layers", "llm",
            "adapter", "emotion_target"]
    if config.adapter == "dual_info":
        keys.append("soft_prompt_length")
    wanted = asdict(config)
    for key in keys:
        have, want = saved.get(key, OLD_CHECKPOINT_DEFAULTS.get(key)), wanted[key]
        if isinstance(have, list):
            have = tuple(have)
        if have != want:
            raise CheckpointError(
                f"{path} was trained with {key} = {have!r}, but this run asks for {key} = {want!r}. Resume with the "
                f"same setting, or start fresh (delete the folder {getattr(path, 'parent', path)} or use another RUN_NAME)."
            )


def load_stage1(path, device: str = "cpu", llm=None, tokenizer=None, merge_lora: bool = True) -> SpeechLLM:
    """A trained stage-1 model from a checkpoint written by notebook 04 (eval mode).

    ``merge_lora`` folds the LoRA factors into the backbone's weights for faster inference
    (``SpeechLLM.merge_lora``); calling ``train()`` on the model undoes it.
    """
    from .train import CheckpointError, load_checkpoint

    payload = load_checkpoint(path, STAGE1_NOTEBOOK)
    if payload.get("kind") != STAGE1_CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a stage-1 checkpoint; run {STAGE1_NOTEBOOK} to make one.")
    known = set(Stage1Config.__dataclass_fields__)  # keys a checkpoint lacks take their defaults (fused, dtw)
    try:
        config = Stage1Config(**{k: v for k, v in payload["config"].items() if k in known})
    except ValueError as err:
        raise CheckpointError(f"{path}: its saved config is not valid here ({err}); run {STAGE1_NOTEBOOK} again.") from err
    model = build_speech_llm(config, llm, tokenizer, device="cpu")
    try:
        model.load_trainable_state(payload["state"])
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: {err}; run {STAGE1_NOTEBOOK} again.") from err
    model = model.to(device).eval()
    return model.merge_lora() if merge_lora else model


def trajectory_cosine(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean cosine similarity between predicted and target token vectors over valid tokens."""
    cosine = F.cosine_similarity(predicted, target, dim=-1)
    return float((cosine * mask).sum() / mask.sum().clamp_min(1))


# ---------------------------------------------------------------------------------------------
# Data from the run directory
# ---------------------------------------------------------------------------------------------
def load_stage1_examples(run, rows: list[dict], tokenizer, splits: tuple[str, ...], require_trajectory: bool = True,
                         sources: tuple[str, ...] | None = None) -> tuple[list[Stage1Example], dict]:
    """Stage-1 examples of the kept pairs in ``splits``, read from notebooks 02 and 03's outputs.

    Query frames come from ``features/semantic.npy`` and ``features/emotion.npy``; response
    targets from ``features/trajectories.npy``, checked token by token against
    ``features/token_spans.jsonl`` (the ids notebook 03 aligned must be the ids tokenized here).
    A pair without a trajectory (or with mismatching ids) is skipped when ``require_trajectory``
    and counted, never given zero targets silently; without ``require_trajectory`` it is kept
    with ``trajectory=None`` (no emotion loss for it). ``query_ids`` are the tokens of the query's
    ASR transcript (``query_asr_text``, else the scripted ``query_text``): dual_info's equivalence
    replacement feeds their embeddings in place of the linguistic adapter's output. Returns
    ``(examples, counts)``.
    """
    from .paths import read_jsonl
    from .store import FrameStore

    features = run.root / "features"
    semantic = FrameStore(run.require(features / "semantic.npy", "semantic_frames"))
    emotion = FrameStore(run.require(features / "emotion.npy", "emotion_frames"))
    trajectories = FrameStore(run.require(features / "trajectories.npy", "trajectories"))
    spans = {s["pair_id"]: s["llm_token_ids"] for s in read_jsonl(run.require(features / "token_spans.jsonl", "trajectories"))}
    counts = {"selected": 0, "used": 0, "no_query_frames": 0, "no_trajectory": 0, "token_mismatch": 0}
    examples = []
    for r in rows:
        if not r.get("kept", True) or r["split"] not in splits or (sources and r["source"] not in sources):
            continue
        counts["selected"] += 1
        key = f"{r['pair_id']}_q"
        if key not in semantic or key not in emotion:
            counts["no_query_frames"] += 1
            continue
        ids = response_token_ids(tokenizer, r["response_text"])
        trajectory = None
        if r["pair_id"] not in trajectories:
            counts["no_trajectory"] += 1
        elif spans.get(r["pair_id"]) != ids:
            counts["token_mismatch"] += 1
        else:
            trajectory = trajectories[r["pair_id"]]
        if trajectory is None and require_trajectory:
            continue
        transcript = r.get("query_asr_text") or r.get("query_text") or ""
        query_ids = list(tokenizer(transcript, add_special_tokens=False)["input_ids"]) or None
        script_ids = list(tokenizer(r.get("query_text") or "", add_special_tokens=False)["input_ids"]) or None
        examples.append(Stage1Example(r["pair_id"], semantic[key], emotion[key], ids, trajectory, query_ids, script_ids))
        counts["used"] += 1
    return examples, counts


def tidy_reply(raw: str) -> str:
    """A generated reply cut to its first sentences (the corpus rule), or the raw text if that empties it."""
    from .corpus import clean_reply

    return clean_reply(raw) or raw.strip()


def plain_messages(text: str, emotion: str | None = None) -> list[dict]:
    """The stage-1 system prompt and the typed text: the cascade's plain prompt (no examples, no emotion)."""
    return [{"role": "system", "content": STAGE1_SYSTEM_PROMPT}, {"role": "user", "content": text}]


def text_replies(llm, tokenizer, texts: list[str], emotions: list[str] | None, prompt: str = "few-shot",
                 batch_size: int = 16, max_new_tokens: int = 40, progress: bool = True) -> list[str]:
    """Replies of the *base* backbone to typed text: the cascade and oracle baselines.

    ``emotions=None``: a text-only cascade (the transcript, no word about how it was said), with
    ``prompt="few-shot"`` (the data-generation chat, its emotion tags removed) or ``"plain"``
    (the stage-1 system prompt, no examples). With emotions: the oracle, given the transcript and
    the true emotion label in the very prompt that wrote the training replies
    (``corpus.chat_messages``). Greedy decoding with a repetition penalty of 1.1.
    """
    from .corpus import chat_messages, generate_replies

    if prompt not in ("few-shot", "plain"):
        raise ValueError(f"prompt must be 'few-shot' or 'plain', got {prompt!r}")
    if prompt == "plain" and emotions is not None:
        raise ValueError("the plain prompt has no place for an emotion label; use prompt='few-shot' for the oracle")
    items = [{"text": t, "emotion": (emotions[i] if emotions is not None else None)} for i, t in enumerate(texts)]
    raw = generate_replies(llm, tokenizer, items, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                           messages_fn=plain_messages if prompt == "plain" else chat_messages)
    return [tidy_reply(r) for r in raw]


# ---------------------------------------------------------------------------------------------
# Training and held-out evaluation (used by notebook 04)
# ---------------------------------------------------------------------------------------------
def config_from_preset(cfg: dict, semantic_dim: int, emotion_dim: int) -> Stage1Config:
    """The stage-1 model config of a preset (``stage1`` section) and the frame widths of the run."""
    s = cfg["stage1"]
    return Stage1Config(llm=cfg["models"]["llm"], semantic_dim=semantic_dim, emotion_dim=emotion_dim,
                        lora_r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                        lora_targets=tuple(s["lora_targets"]), head_width=s["head_width"], head_layers=s["head_layers"],
                        emotion_weight=s["emotion_weight"], max_speech_s=s["max_speech_s"], over_long=s["over_long"],
                        adapter=s.get("adapter", "fused"), emotion_target=s.get("emotion_target", "dtw"),
                        soft_prompt_length=s.get("soft_prompt_length", 4), replacement_prob=s.get("replacement_prob", 0.0),
                        transcribe_prob=s.get("transcribe_prob", 0.0))


def loop_from_preset(cfg: dict) -> dict:
    """The training-loop settings (``train.train_loop``) of a preset's ``stage1`` section."""
    s = cfg["stage1"]
    return {"steps": s["steps"], "batch_size": s["batch_size"], "accumulation": s["accumulation"],
            "lr": {"lora": s["lr_lora"], "adapters": s["lr_adapters"]},
            "weight_decay": {"lora": s["weight_decay_lora"], "adapters": s["weight_decay_adapters"]},
            "warmup_steps": s["warmup_steps"], "clip_norm": s["clip_norm"], "eval_every": s["eval_every"],
            "checkpoint_every": s["eval_every"], "seed": cfg["seed"]}


@torch.no_grad()
def evaluate_teacher_forced(model: SpeechLLM, examples: list[Stage1Example], batch_size: int = 8,
                            progress: bool = False) -> dict:
    """Held-out loss terms and trajectory cosine under teacher forcing.

    Also the cosine of a *constant* predictor, the mean target vector of these very examples:
    emotion frames share a large common direction, so a raw cosine alone would flatter the head.
    The *centered* cosine subtracts the training mean vector from both sides first: 0 for the
    constant predictor, so it measures only the emotion-specific part of the plan. ``mse`` and
    ``one_minus_cos`` are Eq. 3's emotion terms (standardized space). Every emotion number is
    computed against the DTW token trajectories (``out["targets"]``), also for a model trained
    with ``emotion_target = "utterance_mean"``, so all arms are judged on the same targets.
    Returns per-token averages of
    ``ce``, ``mse``, ``one_minus_cos``, ``trajectory_cosine``, ``centered_cosine``,
    ``constant_cosine`` and the number of ``tokens``.
    """
    from tqdm.auto import tqdm

    sums = {"ce": 0.0, "mse": 0.0, "one_minus_cos": 0.0, "trajectory_cosine": 0.0, "centered_cosine": 0.0}
    weights = {"ce": 0, "emotion": 0}
    mean_target = None
    with_targets = [e for e in examples if e.trajectory is not None]
    if with_targets:
        mean_target = torch.as_tensor(np.concatenate([e.trajectory for e in with_targets]).mean(0), device=model.device)
    constant = 0.0
    for start in tqdm(range(0, len(examples), batch_size), desc="held-out", disable=not progress, leave=False):
        chunk = examples[start : start + batch_size]
        out = model(chunk)
        tokens = int(out["response_mask"].sum()) + len(chunk)  # + <|im_end|>
        targets = int(out["target_mask"].sum())
        sums["ce"] += float(out["ce"]) * tokens
        weights["ce"] += tokens
        if targets:
            mse, one_minus_cos = emotion_losses((out["emotion"] - model.target_mean) / model.target_std,
                                                (out["targets"] - model.target_mean) / model.target_std, out["target_mask"])
            sums["mse"] += float(mse) * targets
            sums["one_minus_cos"] += float(one_minus_cos) * targets
            sums["trajectory_cosine"] += trajectory_cosine(out["emotion"], out["targets"], out["target_mask"]) * targets
            constant += trajectory_cosine(mean_target.expand_as(out["targets"]), out["targets"], out["target_mask"]) * targets
            centre = model.target_mean  # the training mean: what is left is the emotion-specific part
            sums["centered_cosine"] += trajectory_cosine(out["emotion"] - centre, out["targets"] - centre,
                                                         out["target_mask"]) * targets
            weights["emotion"] += targets
    result = {"ce": sums["ce"] / max(1, weights["ce"])}
    for key in ("mse", "one_minus_cos", "trajectory_cosine", "centered_cosine"):
        result[key] = sums[key] / max(1, weights["emotion"])
    result["constant_cosine"] = constant / max(1, weights["emotion"])
    result["tokens"] = weights["emotion"]
    return result


def swapped_queries(examples: list[Stage1Example], rows_by_id: dict, seed: int = 0) -> list[Stage1Example]:
    """Each example with the *speech* of another example of the same query emotion and a different sentence.

    The reply, its tokens and its targets stay; only what the model hears changes. An example
    without such a partner is dropped. ``listening_test`` compares the two.
    """
    rng = np.random.default_rng(seed)
    out = []
    for e in examples:
        r = rows_by_id[e.pair_id]
        partners = [o for o in examples if rows_by_id[o.pair_id]["query_emotion"] == r["query_emotion"]
                    and rows_by_id[o.pair_id]["query_text"] != r["query_text"]]
        if partners:
            o = partners[int(rng.integers(len(partners)))]
            out.append(dataclasses.replace(e, semantic=o.semantic, emotion=o.emotion))
    return out


@torch.no_grad()
def listening_test(model: SpeechLLM, examples: list[Stage1Example], rows_by_id: dict, seed: int = 0,
                   batch_size: int = 8) -> dict:
    """Does the model use the *words* it hears? Reply cross-entropy with the true query versus a swapped one.

    Each held-out reply is scored (teacher forcing) once after its own query and once after
    another query spoken with the same emotion (``swapped_queries``). A model that hears only the
    emotion finds the reply equally likely after both: ``gain`` = CE(swapped) - CE(true), in nats
    per reply token, is then about 0. A model that also understands what was said finds the
    true reply more likely after its own query: gain > 0. Returns ``ce_true``, ``ce_swapped``,
    ``gain`` and ``n`` (examples with a partner).
    """
    swapped = swapped_queries(examples, rows_by_id, seed)  # in order, without the examples that have no partner
    kept = {e.pair_id for e in swapped}
    true = [e for e in examples if e.pair_id in kept]
    a = evaluate_teacher_forced(model, true, batch_size)["ce"]
    b = evaluate_teacher_forced(model, swapped, batch_size)["ce"]
    return {"ce_true": a, "ce_swapped": b, "gain": b - a, "n": len(true)}


@torch.no_grad()
def transcripts(model: SpeechLLM, examples: list[Stage1Example], batch_size: int = 16, max_new_tokens: int = 40) -> list[str]:
    """What the model writes when asked for the query's words (the transcription task's prompt), greedy."""
    asked = [dataclasses.replace(e, task="transcribe") for e in examples]
    out = []
    for start in range(0, len(asked), batch_size):
        out += [g["text"].strip() for g in model.generate(asked[start : start + batch_size], max_new_tokens=max_new_tokens,
                                                          repetition_penalty=1.0)]
    return out


@torch.no_grad()
def response_states(model: SpeechLLM, examples: list[Stage1Example], batch_size: int = 8,
                    progress: bool = False) -> list[dict]:
    """What stage 2 hears from the frozen stage-1 model, per example, under teacher forcing.

    For response token i: ``hidden`` (N, H), the last-layer state at token i (the state that
    also predicts token i + 1, as in ``generate``); ``embeds`` (N, H), the LLM's own input
    embedding of token i; ``emotion`` (N, E), the emotion head's vector (the *predicted*
    trajectory, in the emotion encoder's space). float16 numpy arrays: a few hundred MB for the
    cpu preset. Teacher forcing gives the same states as generation when the reply is the same
    (checked in the unit tests), so the decoder trains on exactly what it will see at inference.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].semantic))  # less padding
    by_index = {}
    causal_lm = model.llm.get_base_model()
    for start in tqdm(range(0, len(order), batch_size), desc="stage-1 states", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        batch = model.splice([examples[i] for i in idx], with_response=True)
        last = causal_lm.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                               use_cache=False).last_hidden_state
        gather = batch.response_positions.clamp_min(0)
        hidden = torch.gather(last, 1, gather[..., None].expand(-1, -1, last.shape[-1]))
        emotion = model.emotion_vectors(hidden, batch.response_mask)
        for row, i in enumerate(idx):
            ids = torch.tensor(examples[i].response_ids, dtype=torch.long, device=model.device)
            n = len(ids)
            by_index[i] = {"pair_id": examples[i].pair_id,
                           "hidden": hidden[row, :n].float().cpu().numpy().astype(np.float16),
                           "embeds": model.embed_tokens(ids).float().cpu().numpy().astype(np.float16),
                           "emotion": emotion[row, :n].float().cpu().numpy().astype(np.float16)}
    results = [by_index[i] for i in range(len(examples))]
    model.train(was_training)
    return results


def train_stage1(model: SpeechLLM, train: list[Stage1Example], val: list[Stage1Example], loop: dict, checkpoint_dir,
                 progress: bool = True, device: str = "cpu") -> dict:
    """Stage-1 training with ``train.train_loop``: resumable, evaluated on ``val`` as it goes (an empty ``val``: never)."""
    from .train import train_loop

    def check(payload, path):
        if payload.get("kind") != STAGE1_CHECKPOINT_KIND:
            from .train import CheckpointError

            raise CheckpointError(f"{path} is not a stage-1 checkpoint; delete it to start fresh.")
        check_checkpoint_config(payload["config"], model.config, path)

    return train_loop(model, model.parameter_groups(), train, lambda m, batch: m(batch), loop, checkpoint_dir,
                      eval_fn=(lambda m: evaluate_teacher_forced(m, val)) if val else None,  # no val: no evaluation
                      payload_fn=checkpoint_payload,
                      check_resume=check, lengths=[len(e.semantic) // 5 + len(e.response_ids) for e in train],
                      progress=progress, device=device)
