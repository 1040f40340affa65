"""Align emotion frames to LLM tokens (the paper's Eq. 1-2): Whisper cross-attention + DTW.

Emotion Omni gives every response token an emotion vector: the emotion encoder's frames of the
response speech are aligned to the response's LLM tokens by DTW, and each token's vector is the
mean of its frames (Eq. 2: ``e_i = 1/|A_i| * sum_{t in A_i} f_t``). The alignment signal here is
the one Whisper uses for its word timestamps:

1. ``whisper_cross_attention``: teacher-force Whisper's decoder on the response text; the
   cross-attention says, for each Whisper token, which audio frames (50 per second) the decoder
   reads while predicting it. Normalised as Whisper does: each head's weights standardised over
   the tokens, median-filtered along time, averaged over heads.
2. cost = -attention, plus optional pause rows between words (``pause_aware_cost``: silence is
   cheap there and dear inside words); DTW (``dtw_tslearn``, or the reference ``dtw_numpy``)
   finds the cheapest monotonic path from (first row, first frame) to (last row, last frame).
3. ``align_frames_to_tokens`` / ``spans_from_path``: the path -> a frame span per row.
4. ``llm_token_spans``: Whisper-token spans -> LLM-token spans through character offsets (the two
   tokenizers cut the text differently).
5. ``average_frames``: Eq. 2.

``align_response`` runs 1-4 for one response; ``word_boundaries_from_spans`` and
``boundary_error_ms`` check the result against the exact word boundaries of word-by-word
synthesized speech (``benchmarks/align_accuracy.py``).

Span rules (every function that returns spans follows them): a span is ``(start, end)`` in
frames, end exclusive; starts and ends never decrease; the spans cover every frame; every token
gets at least one frame. When there are at least as many frames as tokens the spans are a
partition (each frame belongs to exactly one token). When tokens outnumber frames a partition is
impossible, so neighbouring tokens share frames (see ``_share_frames``).
"""
from __future__ import annotations

import math

import numpy as np

WHISPER_SR = 16000
SAMPLES_PER_FRAME = 320  # Whisper's encoder: 10 ms mel hop, then a stride-2 conv -> 20 ms frames
FRAME_S = SAMPLES_PER_FRAME / WHISPER_SR  # 0.02 s: the emotion encoder's 50 Hz frames too
MAX_FRAMES = 1500  # Whisper's 30 s window


# ---------------------------------------------------------------------------------------------
# DTW
# ---------------------------------------------------------------------------------------------
def _check_cost(cost) -> np.ndarray:
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError(f"a DTW cost matrix must be 2-D and non-empty, got shape {cost.shape}")
    if not np.all(np.isfinite(cost)):
        raise ValueError("the DTW cost matrix contains NaN or infinite values")
    return cost


def dtw_numpy(cost: np.ndarray) -> tuple[list[tuple[int, int]], float]:
    """Reference DTW over a precomputed cost matrix: (path, total cost).

    The path runs from (0, 0) to (n-1, m-1) with steps (1, 0), (0, 1) and (1, 1) and minimises the
    sum of ``cost`` over its cells. Plain Python loops over lists (faster than indexing numpy
    scalars one by one): about 4-5x slower than tslearn on 30 x 250 matrices
    (``benchmarks/dtw_speed.py``), but every step is visible. Ties are broken as tslearn breaks them
    (diagonal, then (i-1, j), then (i, j-1)) and the sums are formed in the same order, so the two
    give identical paths, not just equal costs.
    """
    cost = _check_cost(cost)
    n, m = cost.shape
    c = cost.tolist()
    inf = float("inf")
    # acc[i + 1][j + 1] = cheapest path cost from (0, 0) to (i, j); row/column 0 is a border of inf.
    acc = [[inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0.0
    for i in range(n):
        above, row, ci = acc[i], acc[i + 1], c[i]
        for j in range(m):
            row[j + 1] = ci[j] + min(above[j + 1], row[j], above[j])
    i, j = n - 1, m - 1
    path = [(i, j)]
    while (i, j) != (0, 0):
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        else:
            diag, up, left = acc[i][j], acc[i][j + 1], acc[i + 1][j]
            if diag <= up and diag <= left:
                i, j = i - 1, j - 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
        path.append((i, j))
    return path[::-1], float(acc[n][m])


def dtw_tslearn(cost: np.ndarray) -> tuple[list[tuple[int, int]], float]:
    """DTW by tslearn (numba-compiled): same contract and result as ``dtw_numpy``, faster.

    The first call in a process compiles the kernel (several seconds): call ``warm_up_dtw()``
    before timing anything.
    """
    from tslearn.metrics import dtw_path_from_metric

    cost = np.ascontiguousarray(_check_cost(cost))
    # With metric="precomputed" tslearn sums the given cells (no square root), so negative
    # costs such as -attention are fine.
    path, total = dtw_path_from_metric(cost, metric="precomputed")
    return [(int(i), int(j)) for i, j in path], float(total)


def warm_up_dtw() -> None:
    """Compile tslearn's DTW kernel now (a tiny matrix), so that later calls are fast."""
    dtw_tslearn(np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------
# Span rules
# ---------------------------------------------------------------------------------------------
def _partition(starts, n_frames: int) -> list[tuple[int, int]]:
    """Spans from proposed start frames, when tokens <= frames: a partition, >= 1 frame each.

    Token 0 starts at frame 0 and the last one ends at ``n_frames``. Each start is pushed up to
    at least one frame after its predecessor and down to leave one frame for each later token;
    otherwise the proposed starts are kept.
    """
    n = len(starts)
    if n > n_frames:
        raise ValueError(f"cannot give {n} tokens one frame each out of {n_frames}")
    cuts = [0]
    for i in range(1, n):
        proposed = int(starts[i])
        cuts.append(min(max(proposed, cuts[-1] + 1), n_frames - (n - i)))
    cuts.append(n_frames)
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


def _share_frames(centers, n_frames: int) -> list[tuple[int, int]]:
    """The documented rule when tokens outnumber frames: one frame per token, shared.

    Each token takes the frame at its aligned position, adjusted so that consecutive tokens move
    forward by 0 or 1 frame, start at frame 0, end at the last frame and so use every frame:
    tokens that fall on the same frame share it (Eq. 2 then gives them the same vector).
    """
    n = len(centers)
    if n < n_frames:
        raise ValueError("_share_frames is for more tokens than frames")
    frames: list[int] = []
    for i, center in enumerate(centers):
        # Band that still lets the walk reach the last frame in steps of at most one.
        low, high = max(0, n_frames - n + i), min(i, n_frames - 1)
        f = int(np.clip(math.floor(center), low, high))
        if frames:
            f = min(max(f, frames[-1]), frames[-1] + 1)
        frames.append(f)
    return [(f, f + 1) for f in frames]


def spans_from_path(path: list[tuple[int, int]], n_rows: int, n_frames: int) -> list[tuple[int, int]]:
    """Frame span of each row token from a DTW path (see the module's span rules).

    Tokens <= frames: token i starts where the path first reaches row i (Whisper's "jump" times)
    and ends where token i+1 starts. Tokens > frames: token i gets exactly the frames the path
    pairs it with, which then overlap by one frame at the path's vertical steps.
    """
    first = [None] * n_rows
    last = [None] * n_rows
    for i, j in path:
        if first[i] is None:
            first[i] = j
        last[i] = j
    if any(f is None for f in first) or path[0] != (0, 0) or path[-1] != (n_rows - 1, n_frames - 1):
        raise ValueError("the path does not run from (0, 0) to the last cell through every row")
    if n_rows <= n_frames:
        return _partition(first, n_frames)
    return [(first[i], last[i] + 1) for i in range(n_rows)]


def align_frames_to_tokens(cost: np.ndarray, dtw=dtw_tslearn) -> list[tuple[int, int]]:
    """(start, end) frame span per row token of ``cost`` (tokens x frames), from the DTW path.

    Follows the module's span rules (``spans_from_path``): a partition of the frames when
    tokens <= frames, the path's own (overlapping) frame runs when tokens outnumber frames.
    """
    cost = _check_cost(cost)
    path, _ = dtw(cost)
    return spans_from_path(path, *cost.shape)


def check_spans(spans, n_frames: int) -> None:
    """Raise ValueError unless ``spans`` follow the module's span rules for ``n_frames`` frames."""
    if not spans:
        raise ValueError("no spans")
    for k, (s, e) in enumerate(spans):
        if not 0 <= s < e <= n_frames:
            raise ValueError(f"span {k} = ({s}, {e}) is empty or outside 0..{n_frames}")
        if k and (s < spans[k - 1][0] or e < spans[k - 1][1]):
            raise ValueError(f"span {k} = ({s}, {e}) goes backwards from {spans[k - 1]}")
        if k and s > spans[k - 1][1]:
            raise ValueError(f"frames {spans[k - 1][1]}..{s} between spans {k - 1} and {k} belong to no token")
    if spans[0][0] != 0 or spans[-1][1] != n_frames:
        raise ValueError(f"spans cover {spans[0][0]}..{spans[-1][1]}, not all of 0..{n_frames}")


# ---------------------------------------------------------------------------------------------
# Eq. 2
# ---------------------------------------------------------------------------------------------
def average_frames(frames: np.ndarray, spans) -> np.ndarray:
    """Eq. 2: row i of the result is the mean of ``frames[start_i:end_i]`` -> (n_tokens, D)."""
    frames = np.asarray(frames)
    if frames.ndim != 2:
        raise ValueError(f"frames must be a (T, D) array, got shape {frames.shape}")
    n_frames = frames.shape[0]
    out = np.empty((len(spans), frames.shape[1]), dtype=np.result_type(frames.dtype, np.float32))
    for k, (s, e) in enumerate(spans):
        if not 0 <= s < e:
            raise ValueError(f"token {k} has an empty span ({s}, {e}): Eq. 2 needs at least one frame")
        if e > n_frames:
            raise ValueError(f"token {k}'s span ({s}, {e}) goes beyond the {n_frames} frames given")
        out[k] = frames[s:e].mean(axis=0)
    return out


# ---------------------------------------------------------------------------------------------
# Whisper cross-attention
# ---------------------------------------------------------------------------------------------
def _check_text(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the response text is empty: there are no tokens to align")
    return text


def whisper_text_tokens(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Whisper token ids of ``text`` and each token's character span in ``text``.

    A space is put in front, as in Whisper's transcripts (" Hello" is what it was trained to
    predict after the prompt); spans are shifted back so they index ``text`` itself.
    """
    _check_text(text)
    prefix = "" if text[0].isspace() else " "
    enc = tokenizer(prefix + text, add_special_tokens=False, return_offsets_mapping=True)
    shift = len(prefix)
    spans = [(max(0, a - shift), max(0, b - shift)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), spans


def _additive_mask(allowed, dtype):
    """Bool (B, 1, L, S) "may attend" -> the additive float mask every attention kernel accepts."""
    import torch

    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _encoder_states(model, features, n_frames: list[int], window: str):
    """Encoder output for the decoder to attend to: the 30 s window or just each audio's frames.

    With ``window="audio"`` each item of the batch gets exactly what it would get alone on its
    own ``2 * n_frames`` mel frames: the mel frames after its audio are zeroed (as the conv's
    zero padding would be alone), and a key mask keeps self-attention off the frames after its
    end, so batching changes nothing but the speed (up to float rounding).
    """
    import torch
    import torch.nn.functional as F

    encoder = model.get_encoder()
    if window == "full":
        return encoder(features).last_hidden_state
    if window != "audio":
        raise ValueError(f"window must be 'full' or 'audio', got {window!r}")
    # The same layers as WhisperEncoder.forward, on 2 * n_frames mel frames: transformers' own
    # forward refuses anything but the 30 s window.
    lengths = torch.tensor(n_frames)
    longest = int(lengths.max())
    mel_valid = torch.arange(2 * longest)[None, :] < 2 * lengths[:, None]
    x = F.gelu(encoder.conv1(features[..., : 2 * longest] * mel_valid[:, None, :].to(features.dtype)))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    mask = None
    if len(n_frames) > 1 and min(n_frames) < longest:
        keys = torch.arange(longest)[None, :] < lengths[:, None]  # (B, T)
        mask = _additive_mask(keys[:, None, None, :].expand(-1, 1, longest, -1), x.dtype)
    for layer in encoder.layers:
        x = layer(x, mask)
    return encoder.layer_norm(x)


def _decode_teacher_forced(decoder, ids, states, n_frames: list[int]) -> None:
    """Run Whisper's decoder layers on right-padded token ids (B, L) over encoder ``states``,
    item b attending to its first ``n_frames[b]`` encoder frames only.

    transformers' ``WhisperDecoder.forward`` passes no encoder mask (Whisper never pads its
    30 s window), so a batch of audios of different lengths would let the shorter ones attend
    to frames after their end; the layers themselves accept one, so the loop is done here: token
    embeddings + positions, then each layer with a causal self-attention mask and a key mask
    over the encoder frames. Padded token positions come after the real ones, so the causal
    mask alone keeps them out of the real ones' computation. Only the projections inside
    (captured by hooks) are used; the output is discarded.
    """
    import torch

    batch, length = ids.shape
    x = decoder.embed_tokens(ids) + decoder.embed_positions.weight[:length]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(batch, 1, -1, -1)
    frames = torch.arange(states.shape[1])[None, :] < torch.tensor(n_frames)[:, None]  # (B, T)
    cross = frames[:, None, None, :].expand(-1, 1, length, -1)
    causal_mask, cross_mask = _additive_mask(causal, x.dtype), _additive_mask(cross, x.dtype)
    for layer in decoder.layers:
        x = layer(x, causal_mask, states, encoder_attention_mask=cross_mask, use_cache=False)


def _padded_states(encoder_states: list[np.ndarray], n_frames: list[int], model):
    """Given encoder frames (one (T_i, d) array per item, e.g. notebook 02's Whisper frames) ->
    a zero-padded (B, max n_frames, d) tensor; each item is cut to its ``n_frames``."""
    import torch

    for i, (states, n) in enumerate(zip(encoder_states, n_frames)):
        if len(states) < n:
            raise ValueError(f"item {i}: {len(states)} encoder frames given, {n} needed (ceil(samples / 320))")
    batch = torch.zeros(len(encoder_states), max(n_frames), model.config.d_model, dtype=model.dtype)
    for i, (states, n) in enumerate(zip(encoder_states, n_frames)):
        batch[i, :n] = torch.as_tensor(np.asarray(states[:n], dtype=np.float32))
    return batch.to(model.device)


def cross_attention_weights_batch(model, processor, wavs16k: list[np.ndarray], token_ids: list[list[int]],
                                  n_frames: list[int | None] | None = None, window: str = "full",
                                  encoder_states: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """``cross_attention_weights`` for several responses in one encoder and one decoder pass.

    Items are padded (mel frames, tokens) and masked so that each gets the weights it would
    get alone (see ``_encoder_states`` and ``_decode_teacher_forced``); the batch only saves
    the per-call overhead and uses the cores better. Returns one (layers, heads, n_tokens + 1,
    n_frames) array per item.

    ``encoder_states`` (one (T_i, d) array per item, T_i >= n_frames) skips Whisper's encoder:
    the decoder attends to these frames instead (notebook 03 passes notebook 02's Whisper
    frames, computed once for the LLM anyway; ``window`` is then ignored). They come from
    ``encoders.whisper_encoder_frames``'s window (the batch's longest audio + 1 s), so they
    differ a little from ``window="audio"``'s.
    """
    import torch

    if len(wavs16k) != len(token_ids):
        raise ValueError(f"{len(wavs16k)} signals but {len(token_ids)} token lists")
    if encoder_states is not None and len(encoder_states) != len(wavs16k):
        raise ValueError(f"{len(wavs16k)} signals but {len(encoder_states)} encoder-state arrays")
    if not wavs16k:
        return []
    n_frames = list(n_frames) if n_frames is not None else [None] * len(wavs16k)
    n_frames = [min(n or math.ceil(len(w) / SAMPLES_PER_FRAME), MAX_FRAMES) for w, n in zip(wavs16k, n_frames)]
    tokenizer = processor.tokenizer
    prompt = list(tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"]))
    sequences = [prompt + list(t) for t in token_ids]
    if max(map(len, sequences)) > model.config.max_target_positions:
        raise ValueError(f"{max(map(len, token_ids))} Whisper tokens are more than Whisper's decoder can read")
    if encoder_states is None:
        features = processor.feature_extractor(
            [np.asarray(w, dtype=np.float32) for w in wavs16k], sampling_rate=WHISPER_SR, return_tensors="pt"
        ).input_features.to(model.device, model.dtype)
    longest = max(map(len, sequences))
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = torch.tensor([seq + [eot] * (longest - len(seq)) for seq in sequences], device=model.device)

    captured: dict = {}
    hooks = []
    decoder = model.get_decoder()
    for index, layer in enumerate(decoder.layers):
        for name in ("q_proj", "k_proj"):
            def hook(_module, _inputs, output, key=(name, index)):
                captured[key] = output.detach()
            hooks.append(getattr(layer.encoder_attn, name).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            if encoder_states is None:
                states = _encoder_states(model, features, n_frames, window)
            else:
                states = _padded_states(encoder_states, n_frames, model)
            # The decoder attends to each item's whole window: its own frames ("audio", given
            # states), or all 1500 ("full", where the padding is part of what Whisper was trained to see).
            full = encoder_states is None and window == "full"
            visible = [states.shape[1]] * len(n_frames) if full else n_frames
            _decode_teacher_forced(decoder, ids, states, visible)
    finally:
        for h in hooks:
            h.remove()

    n_heads = model.config.decoder_attention_heads
    columns = max(n_frames)
    valid = torch.arange(columns, device=model.device)[None, :] < torch.tensor(n_frames, device=model.device)[:, None]
    per_layer = []
    with torch.inference_mode():
        for index in range(len(decoder.layers)):
            q, k = captured[("q_proj", index)], captured[("k_proj", index)][:, :columns]
            head_dim = q.shape[-1] // n_heads
            q = q.view(q.shape[0], q.shape[1], n_heads, head_dim).transpose(1, 2)  # (B, H, L, hd)
            k = k.reshape(k.shape[0], k.shape[1], n_heads, head_dim).transpose(1, 2)  # (B, H, T, hd)
            logits = (q @ k.transpose(2, 3)).float() * head_dim**-0.5
            # softmax over each item's own audio frames only
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
            per_layer.append(logits.softmax(dim=-1)[:, :, len(prompt) - 1 :].cpu().numpy())
    weights = np.stack(per_layer, axis=1)  # (B, layers, H, L - prompt + 1, T)
    return [weights[item, :, :, : len(sequence) - len(prompt) + 1, :frames]
            for item, (sequence, frames) in enumerate(zip(sequences, n_frames))]


def cross_attention_weights(model, processor, wav16k: np.ndarray, token_ids: list[int],
                            n_frames: int | None = None, window: str = "full") -> np.ndarray:
    """Cross-attention of every decoder head: (layers, heads, n_tokens + 1, n_frames).

    The decoder reads ``<|startoftranscript|><|notimestamps|>`` + the tokens (teacher forcing).
    Row r is the position that predicts token r; the extra last row predicts <|endoftext|>. The
    attention logits are rebuilt from the query and key projections (captured by hooks, so any
    attention implementation works) and the softmax is taken over the audio's frames only, as in
    Whisper's word timestamps: attention to the padding after the audio does not count.
    ``cross_attention_weights_batch`` does the same for many responses at once.
    """
    return cross_attention_weights_batch(model, processor, [wav16k], [token_ids], [n_frames], window)[0]


def select_heads(model, heads="last3") -> list[tuple[int, int]]:
    """(layer, head) pairs: "alignment" (the generation config's list), "all", "last<k>" (all heads
    of the last k decoder layers), or an explicit list."""
    n_layers, n_heads = model.config.decoder_layers, model.config.decoder_attention_heads
    if heads == "alignment":
        pairs = getattr(model.generation_config, "alignment_heads", None)
        if not pairs:  # models without the list: Whisper's own fallback, the upper half of the layers
            return [(layer, h) for layer in range(n_layers // 2, n_layers) for h in range(n_heads)]
        return [(int(layer), int(h)) for layer, h in pairs]
    if heads == "all":
        return [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    if isinstance(heads, str) and heads.startswith("last"):
        k = int(heads[4:])
        if not 1 <= k <= n_layers:
            raise ValueError(f"{heads!r}: the decoder has {n_layers} layers")
        return [(layer, h) for layer in range(n_layers - k, n_layers) for h in range(n_heads)]
    return [(int(layer), int(h)) for layer, h in heads]


def alignment_matrix(weights: np.ndarray, heads: list[tuple[int, int]], medfilt: int = 7,
                     standardize: str = "tokens") -> np.ndarray:
    """Whisper's word-timestamp normalisation of cross-attention -> (n_tokens, n_frames), high = aligned.

    Each selected head is standardised (zero mean, unit variance) over the tokens (Whisper's
    choice: at each frame, which token is read most, so heads with different scales count alike)
    or over time; then median-filtered along time (``medfilt`` frames, odd; removes one-frame
    spikes); then the heads are averaged.
    """
    from scipy.ndimage import median_filter

    w = np.stack([weights[layer, h] for layer, h in heads]).astype(np.float64)
    axis = {"tokens": 1, "time": 2}.get(standardize)
    if axis is None:
        raise ValueError(f"standardize must be 'tokens' or 'time', got {standardize!r}")
    w = (w - w.mean(axis=axis, keepdims=True)) / (w.std(axis=axis, keepdims=True) + 1e-8)
    if medfilt > 1 and w.shape[2] > medfilt // 2:
        # mode="mirror" reflects without repeating the edge sample, like torch's "reflect" pad
        # that Whisper uses before its median filter.
        w = median_filter(w, size=(1, 1, medfilt), mode="mirror")
    return w.mean(axis=0)


def whisper_cross_attention(model, processor, wav16k: np.ndarray, text: str, heads="last3",
                            medfilt: int = 7, standardize: str = "tokens", window: str = "full",
                            n_frames: int | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Normalised cross-attention of Whisper tokens on audio frames, and the tokens' character spans.

    ``heads`` defaults to all heads of the last three decoder layers (see ``select_heads``). On
    the kit's espeak-ng speech the generation config's ``alignment_heads`` (those of Whisper's
    word timestamps) place word boundaries 120-200 ms late; with attention-only DTW their mean
    word-boundary error was 176 ms (runs/smoke) and 184 ms (runs/cpu), against 95 and 121 ms
    for the last three layers' heads (``benchmarks/align_accuracy.py``). ``window="audio"``
    runs the encoder on the audio's frames only: about twice as fast, equally accurate there.

    Returns ``(matrix, spans)``: ``matrix`` is (n_whisper_tokens + 1, n_frames), high where a token
    is read; its last row is <|endoftext|> (where the speech has ended; it keeps the last word
    from stretching into trailing silence), whose span is the empty ``(len(text), len(text))``.
    ``n_frames`` defaults to ceil(samples / 320), the 20 ms frames covering the audio. ``wav16k``
    must be 16 kHz mono; silent audio raises ``emo_lib.audio.AudioError``.
    """
    return whisper_cross_attention_batch(model, processor, [wav16k], [text], heads, medfilt, standardize,
                                         window, [n_frames])[0]


def whisper_cross_attention_batch(model, processor, wavs16k: list[np.ndarray], texts: list[str], heads="last3",
                                  medfilt: int = 7, standardize: str = "tokens", window: str = "full",
                                  n_frames: list[int | None] | None = None,
                                  encoder_states: list[np.ndarray] | None = None) -> list[tuple[np.ndarray, list]]:
    """``whisper_cross_attention`` for several responses with one batched Whisper pass
    (``encoder_states``: see ``cross_attention_weights_batch``)."""
    from .audio import prepare_audio

    for text in texts:
        _check_text(text)
    wavs = [prepare_audio(w, WHISPER_SR, max_seconds=30.0, name="response audio")[0] for w in wavs16k]
    tokens = [whisper_text_tokens(processor.tokenizer, text) for text in texts]
    weights = cross_attention_weights_batch(model, processor, wavs, [ids for ids, _ in tokens], n_frames, window,
                                            encoder_states)
    chosen = select_heads(model, heads)
    return [(alignment_matrix(w, chosen, medfilt, standardize), spans + [(len(text), len(text))])
            for w, (_, spans), text in zip(weights, tokens, texts)]


# ---------------------------------------------------------------------------------------------
# Whisper tokens -> LLM tokens
# ---------------------------------------------------------------------------------------------
def _character_times(text: str, whisper_spans, whisper_frame_spans, n_frames: int) -> np.ndarray:
    """(len(text), 2) start/end time in frames (float) of each visible character; NaN elsewhere.

    A Whisper token's frames are spread evenly over its visible (non-space) characters, so a
    token covering several LLM tokens hands them frames in proportion to their characters.
    """
    times = np.full((len(text), 2), np.nan)
    for (a, b), (s, e) in zip(whisper_spans, whisper_frame_spans):
        chars = [c for c in range(max(a, 0), min(b, len(text))) if not text[c].isspace()]
        if not chars:
            continue
        s, e = float(max(0, s)), float(min(e, n_frames))
        step = (e - s) / len(chars)
        for k, c in enumerate(chars):
            start, end = s + k * step, s + (k + 1) * step
            # A character split between two byte-level tokens (e.g. an emoji) gets both their frames.
            times[c, 0] = start if np.isnan(times[c, 0]) else min(times[c, 0], start)
            times[c, 1] = end if np.isnan(times[c, 1]) else max(times[c, 1], end)
    return times


def llm_tokenize(llm_tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """LLM token ids of ``text`` (no special tokens) and their character spans."""
    enc = llm_tokenizer(_check_text(text), add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def llm_token_spans(text: str, llm_tokenizer, whisper_spans, whisper_frame_spans, n_frames: int,
                    ) -> list[tuple[int, int]]:
    """Frame span of each LLM token of ``text`` from the Whisper tokens' frame spans.

    Character offsets link the two tokenizations: an LLM token's time runs from the start of its
    first visible character to the end of its last (characters inherit their Whisper token's
    frames, split evenly among its characters). A token with no visible character (whitespace)
    starts where the previous token ended. The times are then turned into spans by the module's
    span rules: a partition when tokens <= frames, shared frames otherwise.
    """
    if len(whisper_spans) != len(whisper_frame_spans):
        raise ValueError(f"{len(whisper_spans)} Whisper character spans but {len(whisper_frame_spans)} frame spans")
    if n_frames < 1:
        raise ValueError("there are no frames to align")
    _, offsets = llm_tokenize(llm_tokenizer, text)
    times = _character_times(text, whisper_spans, whisper_frame_spans, n_frames)
    starts, ends = [], []
    for a, b in offsets:
        visible = times[a:b][~np.isnan(times[a:b, 0])]
        if len(visible):
            starts.append(visible[:, 0].min())
            ends.append(visible[:, 1].max())
        else:
            previous = ends[-1] if ends else 0.0
            starts.append(previous)
            ends.append(previous)
    if len(offsets) <= n_frames:
        return _partition([round(s) for s in starts], n_frames)
    return _share_frames([(s + e) / 2 for s, e in zip(starts, ends)], n_frames)


# ---------------------------------------------------------------------------------------------
# Pauses: optional silence between words
# ---------------------------------------------------------------------------------------------
def silence_probability(wav16k: np.ndarray, n_frames: int, threshold_db: float = -40.0,
                        width_db: float = 3.0) -> np.ndarray:
    """(n_frames,) in [0, 1]: how surely each 20 ms frame is silence.

    A frame's RMS energy is compared with the loudest frame's: ``threshold_db`` below it (the
    kit's ``speech_bounds`` threshold) gives 0.5, and the score moves from 0 to 1 over a few
    ``width_db`` (a logistic), so frames near the threshold do not flip the alignment.
    """
    from scipy.special import expit

    from .audio import frame_energy_db

    energy = frame_energy_db(np.asarray(wav16k, dtype=np.float32), WHISPER_SR, hop_s=FRAME_S, frame_s=FRAME_S)
    energy = np.concatenate([energy, np.full(max(0, n_frames - len(energy)), energy.min())])[:n_frames]
    return expit(((energy.max() + threshold_db) - energy) / width_db)


def _starts_word(text: str, span: tuple[int, int]) -> bool:
    a, b = span
    return 0 < a < len(text) and a < b and (text[a].isspace() or text[a - 1].isspace())


def pause_aware_cost(attention: np.ndarray, whisper_spans, text: str, silence: np.ndarray,
                     silence_weight: float) -> tuple[np.ndarray, list[int]]:
    """DTW cost with a pause row before each word, after the last one, and at the start.

    Forced aligners let silence sit between words; DTW on attention alone has nowhere to put a
    pause, so it stretches a neighbouring word over it (worst after commas and full stops, where
    the TTS pauses for hundreds of ms). Each token row costs ``-attention + w * silence`` (a word
    is not silent) and each pause row ``w * (1 - silence)`` (a pause is). DTW visits every row,
    so a pause row takes at least one frame even where the speaker did not pause: 20 ms, handed
    back to a word by ``_merge_pauses``. Returns the cost and, per row, the token row it stands
    for (-1 for a pause).
    """
    w = float(silence_weight)
    token_cost = -attention + w * silence[None, :]
    pause_cost = w * (1.0 - silence)
    rows, kinds = [pause_cost], [-1]
    last = len(attention) - 1  # <|endoftext|>
    for r in range(len(attention)):
        if r == last or (r > 0 and _starts_word(text, whisper_spans[r])):
            rows.append(pause_cost)
            kinds.append(-1)
        rows.append(token_cost[r])
        kinds.append(r)
    return np.stack(rows), kinds


def _merge_pauses(row_spans, kinds) -> list[tuple[int, int]]:
    """Frame spans of the token rows, each pause's frames split at its middle between the token
    before and the token after (all to the one neighbour at either end), so that every frame
    still belongs to a token (Eq. 2 averages over all frames)."""
    n_tokens = sum(k >= 0 for k in kinds)
    starts, ends = [None] * n_tokens, [None] * n_tokens
    for (s, e), k in zip(row_spans, kinds):
        if k >= 0:
            starts[k], ends[k] = s, e
    for index, ((s, e), k) in enumerate(zip(row_spans, kinds)):
        if k >= 0:
            continue
        before = kinds[index - 1] if index > 0 else None
        after = kinds[index + 1] if index + 1 < len(kinds) else None
        before = before if before is not None and before >= 0 else None
        after = after if after is not None and after >= 0 else None
        middle = s + (e - s) // 2 if before is not None and after is not None else (e if before is not None else s)
        if before is not None:
            ends[before] = middle
        if after is not None:
            starts[after] = middle
    return list(zip(starts, ends))


# ---------------------------------------------------------------------------------------------
# One response
# ---------------------------------------------------------------------------------------------
def align_attention(attention: np.ndarray, whisper_spans, text: str, llm_tokenizer,
                    silence: np.ndarray | None = None, silence_weight: float = 8.0,
                    dtw=dtw_tslearn) -> dict:
    """Everything after Whisper: DTW on -attention (+ pause rows), then LLM-token spans.

    ``attention`` and ``whisper_spans`` come from ``whisper_cross_attention`` (last row
    <|endoftext|>). With ``silence`` (from ``silence_probability``) and ``silence_weight`` > 0,
    pause rows are added (``pause_aware_cost``); they are dropped when rows would outnumber
    frames. See ``align_response`` for the keys returned.
    """
    n_rows, n_frames = attention.shape
    use_pauses = silence is not None and silence_weight > 0
    if use_pauses:
        cost, kinds = pause_aware_cost(attention, whisper_spans, text, silence, silence_weight)
        use_pauses = len(kinds) <= n_frames
    if not use_pauses:
        cost, kinds = -attention, list(range(n_rows))
    path, path_cost = dtw(cost)
    row_spans = spans_from_path(path, len(kinds), n_frames)
    whisper_frame_spans = _merge_pauses(row_spans, kinds) if use_pauses else row_spans
    # The <|endoftext|> row has no characters: it only stops the last token at the end of speech.
    spans = llm_token_spans(text, llm_tokenizer, whisper_spans[:-1], whisper_frame_spans[:-1], n_frames)
    llm_ids, llm_offsets = llm_tokenize(llm_tokenizer, text)
    return {
        "text": text,
        "n_frames": n_frames,
        "frame_s": FRAME_S,
        "llm_token_ids": llm_ids,
        "llm_tokens": [text[a:b] for a, b in llm_offsets],
        "llm_char_spans": llm_offsets,
        "llm_token_spans": spans,
        "whisper_char_spans": list(whisper_spans),
        "whisper_token_spans": whisper_frame_spans,
        "cost": cost,
        "row_tokens": kinds,
        "path": path,
        "path_cost": path_cost,
        # A pause row forced onto speech (DTW gives every row a frame) is not a pause.
        "pauses": [(a, b) for (a, b), k in zip(row_spans, kinds)
                   if use_pauses and k < 0 and silence[a:b].mean() >= 0.5],
    }


def align_response(model, processor, llm_tokenizer, wav16k: np.ndarray, text: str, dtw=dtw_tslearn,
                   n_frames: int | None = None, silence_weight: float = 8.0, **attention_options) -> dict:
    """Align one response's speech (16 kHz mono) to its LLM tokens; everything a notebook plots.

    ``n_frames`` forces the number of 50 Hz frames (pass the emotion encoder's T if it differs
    from ceil(samples / 320)); ``silence_weight`` = 0 turns the pause rows off (plain Whisper
    attention DTW; 8, the default, was chosen on runs/smoke and checked on runs/cpu);
    ``attention_options`` go to ``whisper_cross_attention``. Returns a dict:
    - ``llm_token_ids``, ``llm_tokens`` (their text), ``llm_char_spans``, ``llm_token_spans``
      ((start, end) frames, end exclusive: the A_i of Eq. 2, for ``average_frames``),
      ``n_frames`` and ``frame_s`` (0.02);
    - ``whisper_token_ids``, ``whisper_tokens`` (the last is <|endoftext|>), their character
      spans ``whisper_char_spans`` and frame spans ``whisper_token_spans``;
    - ``attention`` (Whisper tokens x frames), ``silence`` (per frame), ``cost`` (the DTW's
      matrix: one row per Whisper token plus the pause rows), ``row_tokens`` (per cost row, its
      Whisper token, -1 for a pause), ``path``, ``path_cost``, ``pauses`` (frame spans of the
      pause rows that sit on silence; their frames are also inside ``llm_token_spans``, split
      between the neighbouring tokens, and ``word_boundaries_from_spans`` can cut them out).
    """
    return align_responses(model, processor, llm_tokenizer, [wav16k], [text], dtw, [n_frames], silence_weight,
                           batch_size=1, **attention_options)[0]


def align_responses(model, processor, llm_tokenizer, wavs16k: list[np.ndarray], texts: list[str], dtw=dtw_tslearn,
                    n_frames: list[int | None] | None = None, silence_weight: float = 8.0, batch_size: int = 8,
                    progress: bool = False, encoder_states: list[np.ndarray] | None = None,
                    **attention_options) -> list[dict]:
    """``align_response`` for many responses: Whisper runs on batches of similar length.

    Same results as one ``align_response`` per item (the batch is padded and masked, see
    ``cross_attention_weights_batch``), in the input order. Measured on 48 smoke-preset
    responses (about 10 s each, 2 busy CPU cores, ``window="audio"``): 63 s one at a time, 19 s
    in batches of 8, 15 s in batches of 16; with ``encoder_states`` (no encoder pass) 10-12 s.
    ``n_frames`` gives each item's frame count (None: from its audio); ``encoder_states``: see
    ``cross_attention_weights_batch``.
    """
    from tqdm.auto import tqdm

    from .audio import prepare_audio

    if len(wavs16k) != len(texts):
        raise ValueError(f"{len(wavs16k)} signals but {len(texts)} texts")
    for text in texts:
        _check_text(text)
    wavs = [prepare_audio(w, WHISPER_SR, max_seconds=30.0, name="response audio")[0] for w in wavs16k]
    n_frames = list(n_frames) if n_frames is not None else [None] * len(wavs)
    eot = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    out: list[dict | None] = [None] * len(wavs)
    order = sorted(range(len(wavs)), key=lambda i: (len(wavs[i]), i))  # little padding per batch
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with tqdm(total=len(wavs), desc="aligning responses", unit="response", disable=not progress) as bar:
        for idx in batches:
            states = None if encoder_states is None else [encoder_states[i] for i in idx]
            matrices = whisper_cross_attention_batch(model, processor, [wavs[i] for i in idx], [texts[i] for i in idx],
                                                     n_frames=[n_frames[i] for i in idx], encoder_states=states,
                                                     **attention_options)
            for i, (attention, whisper_spans) in zip(idx, matrices):
                silence = silence_probability(wavs[i], attention.shape[1])
                result = align_attention(attention, whisper_spans, texts[i], llm_tokenizer, silence, silence_weight, dtw)
                whisper_ids = whisper_text_tokens(processor.tokenizer, texts[i])[0] + [eot]
                result.update(
                    whisper_token_ids=whisper_ids,
                    whisper_tokens=processor.tokenizer.convert_ids_to_tokens(whisper_ids),
                    attention=attention,
                    silence=silence,
                )
                out[i] = result
            bar.update(len(idx))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Word boundaries: the alignment's accuracy check
# ---------------------------------------------------------------------------------------------
def _word_char_spans(text: str) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for word in text.split(" "):
        spans.append((cursor, cursor + len(word)))
        cursor += len(word) + 1
    return spans


def word_boundaries_from_spans(text: str, llm_tokenizer, llm_spans, frame_s: float = FRAME_S,
                               speech_region_s: tuple[float, float] | None = None,
                               pauses=None) -> list[tuple[float, float]]:
    """(start_s, end_s) of each word of ``text.split(" ")`` from the LLM tokens' frame spans.

    A word runs from the start of its first token to the end of its last (tokens that share a
    visible character with the word). The spans cover every frame, so silence sits inside
    words unless it is cut out: ``pauses`` (frame spans, ``align_response(...)["pauses"]``) are
    cut from the words' edges, and ``speech_region_s`` (seconds, e.g. from
    ``emo_lib.audio.speech_bounds``) clips everything to the speech.
    """
    _, offsets = llm_tokenize(llm_tokenizer, text)
    if len(offsets) != len(llm_spans):
        raise ValueError(f"{len(llm_spans)} spans for the {len(offsets)} LLM tokens of the text")
    out: list[tuple[float, float]] = []
    for a, b in _word_char_spans(text):
        visible = {c for c in range(a, b) if not text[c].isspace()}
        tokens = [k for k, (ta, tb) in enumerate(offsets) if visible & set(range(ta, tb))]
        if not tokens:  # an empty "word" (two spaces in a row): zero length where the last one ended
            previous = out[-1][1] if out else 0.0
            out.append((previous, previous))
            continue
        start, end = llm_spans[tokens[0]][0], llm_spans[tokens[-1]][1]
        for p_start, p_end in pauses or []:
            if p_start <= start < p_end < end:  # a pause at the word's start
                start = p_end
            elif start < p_start < end <= p_end:  # a pause at its end
                end = p_start
        start, end = start * frame_s, end * frame_s
        if speech_region_s is not None:
            lo, hi = speech_region_s
            start, end = min(max(start, lo), hi), min(max(end, lo), hi)
        out.append((start, end))
    return out


def proportional_word_boundaries(text: str, speech_start_s: float, speech_end_s: float,
                                 ) -> list[tuple[float, float]]:
    """The baseline that is NOT an alignment: cut the speech region in proportion to word lengths.

    Words are ``text.split(" ")``; each gets a share of [speech_start_s, speech_end_s] equal to
    its share of the characters. It ignores what was said when, so it measures what the DTW
    alignment adds.
    """
    _check_text(text)
    if not speech_end_s > speech_start_s:
        raise ValueError(f"the speech region ({speech_start_s}, {speech_end_s}) is empty")
    lengths = np.array([len(w) for w in text.split(" ")], dtype=np.float64)
    fractions = np.concatenate([[0.0], np.cumsum(lengths)]) / lengths.sum()
    edges = speech_start_s + (speech_end_s - speech_start_s) * fractions
    return [(float(edges[i]), float(edges[i + 1])) for i in range(len(lengths))]


def boundary_error_ms(predicted, truth) -> float:
    """Mean absolute error over all word starts and ends, in ms.

    Both are lists of (start_s, end_s); ``truth`` may also be the manifest's
    ``response_word_boundaries`` (dicts with start_s and end_s).
    """
    truth = [(t["start_s"], t["end_s"]) if isinstance(t, dict) else t for t in truth]
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted words but {len(truth)} true ones")
    if not truth:
        raise ValueError("no words to compare")
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    return float(np.abs(p - t).mean() * 1000.0)
