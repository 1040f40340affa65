"""Alignment of emotion frames to LLM tokens: DTW, span rules, Eq. 2, and one real espeak/Whisper case."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import shutil

import numpy as np
import pytest

from emo_lib import align
from emo_lib.audio import AudioError


# --- helpers -----------------------------------------------------------------------------------
class CharTokenizer:
    """Stand-in for a fast tokenizer: one token per ``size`` characters of each space-led word
    (offsets include the leading space, as byte-level BPE tokenizers give them)."""

    def __init__(self, size: int = 3):
        self.size = size

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        offsets, start = [], 0
        for word in text.split(" "):
            end = start + len(word)
            lead = start - 1 if start > 0 else start  # the space before a word rides with it
            cuts = list(range(start, end, self.size)) or [start]
            for k, a in enumerate(cuts):
                offsets.append((lead if k == 0 else a, min(a + self.size, end)))
            start = end + 1
        return {"input_ids": list(range(len(offsets))), "offset_mapping": offsets}


def random_warp(n_rows: int, n_cols: int, rng) -> np.ndarray:
    """A monotonic onto map from columns to rows: w[0] = 0, w[-1] = n_rows - 1, steps of 0 or 1."""
    steps = np.zeros(n_cols - 1, dtype=int)
    steps[rng.choice(n_cols - 1, size=n_rows - 1, replace=False)] = 1
    return np.concatenate([[0], np.cumsum(steps)])


def all_paths(n, m):
    """Every monotonic path from (0, 0) to (n-1, m-1) with steps (1,0), (0,1), (1,1) (tiny n, m)."""
    def walk(i, j):
        if (i, j) == (n - 1, m - 1):
            yield [(i, j)]
            return
        for di, dj in ((1, 0), (0, 1), (1, 1)):
            if i + di < n and j + dj < m:
                for rest in walk(i + di, j + dj):
                    yield [(i, j)] + rest
    yield from walk(0, 0)


# --- DTW ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtw", [align.dtw_numpy, align.dtw_tslearn])
def test_dtw_recovers_a_known_warp(dtw):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(12, 4))  # 12 distinct "token" vectors
    warp = random_warp(12, 60, rng)  # which token each of 60 frames shows
    frames = tokens[warp] + 0.01 * rng.normal(size=(60, 4))  # the warped, slightly noisy sequence
    cost = np.linalg.norm(tokens[:, None, :] - frames[None, :, :], axis=-1)
    path, _ = dtw(cost)
    assert path == [(int(w), j) for j, w in enumerate(warp)]
    spans = align.spans_from_path(path, 12, 60)
    expected = [(int(np.flatnonzero(warp == i)[0]), int(np.flatnonzero(warp == i)[-1]) + 1) for i in range(12)]
    assert spans == expected
    # Transposed (rows outnumber columns): the same map, read the other way.
    path_t, _ = dtw(cost.T)
    assert path_t == [(j, int(w)) for j, w in enumerate(warp)]


def test_numpy_and_tslearn_agree_on_random_matrices():
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (1, 7), (7, 1), (5, 9), (30, 250), (40, 25)]:
        for _ in range(3):
            cost = rng.normal(size=shape)  # negative cells too, as -attention has
            path_np, total_np = align.dtw_numpy(cost)
            path_ts, total_ts = align.dtw_tslearn(cost)
            assert path_np == path_ts
            assert total_np == pytest.approx(total_ts, rel=1e-12, abs=1e-12)
            assert total_np == pytest.approx(sum(cost[i, j] for i, j in path_np))


def test_dtw_numpy_finds_the_cheapest_path_by_brute_force():
    rng = np.random.default_rng(2)
    for n, m in [(3, 4), (4, 3), (4, 4)]:
        cost = rng.random((n, m))
        best = min(sum(cost[i, j] for i, j in p) for p in all_paths(n, m))
        path, total = align.dtw_numpy(cost)
        assert total == pytest.approx(best)
        assert path[0] == (0, 0) and path[-1] == (n - 1, m - 1)
        assert all((i1 - i0, j1 - j0) in {(1, 0), (0, 1), (1, 1)} for (i0, j0), (i1, j1) in zip(path, path[1:]))


def test_dtw_rejects_bad_cost_matrices():
    for bad in [np.zeros((0, 3)), np.zeros(4), np.array([[0.0, np.nan]])]:
        with pytest.raises(ValueError):
            align.dtw_numpy(bad)
        with pytest.raises(ValueError):
            align.dtw_tslearn(bad)


# --- span rules ----------------------------------------------------------------------------------
def test_spans_from_a_diagonal_cost_are_a_partition():
    rng = np.random.default_rng(3)
    for n, m in [(1, 5), (5, 5), (7, 40), (30, 250)]:
        cost = rng.random((n, m))
        spans = align.align_frames_to_tokens(cost)
        align.check_spans(spans, m)
        assert all(e == s2 for (_, e), (s2, _) in zip(spans, spans[1:]))  # no frame shared


def test_more_tokens_than_frames_share_frames():
    rng = np.random.default_rng(4)
    cost = rng.random((10, 4))
    spans = align.align_frames_to_tokens(cost)
    align.check_spans(spans, 4)  # monotonic, every frame used, >= 1 frame each
    assert len(spans) == 10
    # LLM tokens outnumbering frames: one frame each, neighbours share, every frame used.
    text = "abcdefghij klmnopqrst uvwxyzabcd"
    tokenizer = CharTokenizer(size=1)  # 30 tokens
    whisper_spans = [(0, 10), (10, 21), (21, 32)]
    llm = align.llm_token_spans(text, tokenizer, whisper_spans, [(0, 2), (2, 3), (3, 5)], 5)
    align.check_spans(llm, 5)
    assert len(llm) == 30 and all(e - s == 1 for s, e in llm)
    # The alignment still decides which frames: the first word's ten letters sit in frames 0-1.
    assert {s for s, _ in llm[:10]} <= {0, 1} and {s for s, _ in llm[-10:]} <= {3, 4}


def test_more_tokens_than_frames_through_the_whole_alignment():
    # 4 frames of audio for 5 Whisper rows (+ pause rows): pauses are dropped, tokens share frames.
    text = "aaa bbb ccc ddd"
    rng = np.random.default_rng(5)
    spans = [(0, 3), (3, 7), (7, 11), (11, 15), (15, 15)]
    out = align.align_attention(rng.random((5, 4)), spans, text, CharTokenizer(size=1), np.zeros(4), 8.0)
    assert out["pauses"] == [] and out["cost"].shape == (5, 4)
    assert len(out["llm_token_spans"]) == 12
    align.check_spans(out["llm_token_spans"], 4)


def test_partition_rule_pushes_colliding_starts_apart():
    assert align._partition([0, 3, 3, 3, 9], 10) == [(0, 3), (3, 4), (4, 5), (5, 9), (9, 10)]
    assert align._partition([0, 9, 9], 10) == [(0, 8), (8, 9), (9, 10)]  # room left for the last ones
    with pytest.raises(ValueError):
        align._partition([0, 1, 2], 2)


def test_llm_spans_follow_character_offsets():
    text = "Hello wonderful world"
    whisper_spans = [(0, 5), (5, 15), (15, 21)]  # " wonderful" is one Whisper token...
    whisper_frames = [(0, 10), (10, 30), (30, 40)]
    tokenizer = CharTokenizer(size=3)  # ... but four LLM tokens: " won", "der", "ful"
    ids = tokenizer(text)["offset_mapping"]
    assert [text[a:b] for a, b in ids] == ["Hel", "lo", " won", "der", "ful", " wor", "ld"]
    spans = align.llm_token_spans(text, tokenizer, whisper_spans, whisper_frames, 40)
    align.check_spans(spans, 40)
    # "Hello" (10 frames, 5 letters): 3 + 2 letters -> 6 + 4 frames; "wonderful": 9 letters over
    # 20 frames, split 3/3/3; "world": 3 + 2 letters of 10 frames.
    assert spans == [(0, 6), (6, 10), (10, 17), (17, 23), (23, 30), (30, 36), (36, 40)]
    words = align.word_boundaries_from_spans(text, tokenizer, spans, frame_s=0.02)
    np.testing.assert_allclose(words, [(0.0, 0.2), (0.2, 0.6), (0.6, 0.8)])


# --- Eq. 2 ---------------------------------------------------------------------------------------
def test_average_frames_is_eq_2():
    frames = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [7.0, 6.0], [9.0, 8.0]])
    out = align.average_frames(frames, [(0, 1), (1, 4), (4, 5)])
    assert out.shape == (3, 2)
    np.testing.assert_allclose(out, [[1.0, 0.0], [5.0, 4.0], [9.0, 8.0]])
    shared = align.average_frames(frames, [(0, 2), (1, 2), (1, 5)])  # overlapping spans are allowed
    np.testing.assert_allclose(shared, [[2.0, 1.0], [3.0, 2.0], [6.0, 5.0]])


def test_average_frames_refuses_empty_or_out_of_range_spans():
    frames = np.zeros((5, 3))
    with pytest.raises(ValueError, match="token 1 has an empty span"):
        align.average_frames(frames, [(0, 2), (2, 2), (2, 5)])
    with pytest.raises(ValueError, match="beyond the 5 frames"):
        align.average_frames(frames, [(0, 3), (3, 6)])
    with pytest.raises(ValueError, match=r"\(T, D\)"):
        align.average_frames(np.zeros(5), [(0, 5)])


# --- pauses --------------------------------------------------------------------------------------
def test_pause_rows_absorb_silence_and_give_it_back():
    # Two words (10 and 8 frames) around a 10-frame silence, then 2 silent frames; the attention
    # of each word is smeared over the silence next to it.
    text = "aaa bbb"
    silence = np.r_[np.zeros(10), np.ones(10), np.zeros(8), np.ones(2)]
    attention = np.zeros((3, 30))  # rows: "aaa", " bbb", <|endoftext|>
    attention[0, :15], attention[1, 15:28], attention[2, 28:] = 1.0, 1.0, 1.0
    spans = [(0, 3), (3, 7), (7, 7)]
    out = align.align_attention(attention, spans, text, CharTokenizer(size=3), silence, silence_weight=8.0)
    assert out["pauses"][0] == (10, 20)  # the pause between the words found exactly
    assert all(silence[a:b].mean() >= 0.5 for a, b in out["pauses"])  # forced pause rows on speech are left out
    assert out["whisper_token_spans"][:2] == [(0, 15), (15, 28)]  # its frames split at its middle
    align.check_spans(out["llm_token_spans"], 30)
    plain = align.align_attention(attention, spans, text, CharTokenizer(size=3), None, 0.0)
    assert plain["pauses"] == [] and plain["cost"].shape == (3, 30)


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_text_is_a_clear_error(text):
    with pytest.raises(ValueError, match="empty"):
        align.align_response(None, None, None, np.ones(16000, np.float32), text)
    with pytest.raises(ValueError, match="empty"):
        align.llm_token_spans(text, CharTokenizer(), [], [], 10)
    with pytest.raises(ValueError, match="empty"):
        align.proportional_word_boundaries(text, 0.0, 1.0)


def test_silent_audio_is_an_audio_error():
    with pytest.raises(AudioError, match="silent"):
        align.align_response(None, None, None, np.zeros(16000, np.float32), "Hello there.")


def test_word_boundary_helpers():
    words = align.proportional_word_boundaries("ab cdef gh", 1.0, 2.6)
    np.testing.assert_allclose(words, [(1.0, 1.4), (1.4, 2.2), (2.2, 2.6)])
    truth = [{"word": "a", "start_s": 0.1, "end_s": 0.5}, {"word": "b", "start_s": 0.6, "end_s": 1.0}]
    assert align.boundary_error_ms([(0.1, 0.55), (0.55, 1.0)], truth) == pytest.approx(25.0)
    with pytest.raises(ValueError):
        align.boundary_error_ms([(0.0, 1.0)], truth)


# --- one real case: espeak-ng word by word, Whisper tiny.en, the LLM tokenizer -----------------
@pytest.fixture(scope="module")
def models():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed: it synthesizes the test speech")
    from transformers import AutoTokenizer

    from emo_lib.asr import load_whisper
    from emo_lib.pretrained import ModelSourceError, llm_folder

    try:
        model, processor = load_whisper()
        tokenizer = AutoTokenizer.from_pretrained(llm_folder())
    except (ModelSourceError, RuntimeError) as err:
        pytest.skip(f"packaged weights missing: {err}")
    align.warm_up_dtw()
    return model, processor, tokenizer


def test_real_response_aligns_better_than_proportional(models):
    from emo_lib import tts
    from emo_lib.audio import resample, speech_bounds

    model, processor, tokenizer = models
    text = "Thank you for telling me, that sounds really hard."
    prosody = tts.sample_prosody("sadness", np.random.default_rng(0), jitter=0.0)
    wav, truth = tts.synthesize_word_by_word(text, "f2", prosody)
    wav16 = resample(wav, tts.SAMPLE_RATE, 16000)
    out = align.align_response(model, processor, tokenizer, wav16, text)
    align.check_spans(out["llm_token_spans"], out["n_frames"])
    assert out["n_frames"] == -(-len(wav16) // 320)
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert len(out["llm_token_spans"]) == len(out["llm_token_ids"]) == n_tokens
    emotions = align.average_frames(np.random.default_rng(0).normal(size=(out["n_frames"], 8)), out["llm_token_spans"])
    assert emotions.shape == (len(out["llm_token_ids"]), 8)

    start, end = speech_bounds(wav16, 16000)
    region = (start / 16000, end / 16000)
    words = align.word_boundaries_from_spans(text, tokenizer, out["llm_token_spans"], speech_region_s=region,
                                             pauses=out["pauses"])
    baseline = align.boundary_error_ms(align.proportional_word_boundaries(text, *region), truth)
    error = align.boundary_error_ms(words, truth)
    assert error < 60.0 and error < 0.6 * baseline, (error, baseline)
    # Attention alone (no pause rows) must still beat the baseline clearly.
    plain = align.align_attention(out["attention"], out["whisper_char_spans"], text, tokenizer, None, 0.0)
    plain_words = align.word_boundaries_from_spans(text, tokenizer, plain["llm_token_spans"], speech_region_s=region)
    assert align.boundary_error_ms(plain_words, truth) < 0.75 * baseline


def _three_responses(processor):
    from emo_lib import tts
    from emo_lib.audio import resample

    texts = ["Thank you for telling me, that sounds really hard.", "Oh wow, congratulations!",
             "I am so sorry to hear that your dog is sick, I hope he gets better soon."]
    wavs = []
    for text, speaker in zip(texts, ["f2", "m1", "m3"]):
        wav, _ = tts.synthesize_word_by_word(text, speaker, tts.sample_prosody("neutral", np.random.default_rng(0), jitter=0.0))
        wavs.append(resample(wav, tts.SAMPLE_RATE, 16000))
    return texts, wavs, [align.whisper_text_tokens(processor.tokenizer, t)[0] for t in texts]


@pytest.mark.parametrize("window", ["audio", "full"])
def test_batched_cross_attention_equals_one_at_a_time(models, window):
    model, processor, _ = models
    texts, wavs, ids = _three_responses(processor)
    batch = align.cross_attention_weights_batch(model, processor, wavs, ids, window=window)
    for wav, token_ids, batched in zip(wavs, ids, batch):
        alone = align.cross_attention_weights(model, processor, wav, token_ids, window=window)
        assert batched.shape == alone.shape == (4, 6, len(token_ids) + 1, -(-len(wav) // 320))
        np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_cross_attention_equals_transformers_own_forward(models):
    """The kit's decoder loop gives Whisper's own cross-attention, renormalised over the audio frames."""
    import torch

    model, processor, _ = models
    texts, wavs, ids = _three_responses(processor)
    ours = align.cross_attention_weights(model, processor, wavs[0], ids[0], window="full")
    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    features = processor.feature_extractor(wavs[0], sampling_rate=16000, return_tensors="pt").input_features
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")  # only eager returns attention weights
    try:
        with torch.inference_mode():
            out = model.model(input_features=features, decoder_input_ids=torch.tensor([prompt + ids[0]]),
                              output_attentions=True)
    finally:
        model.set_attn_implementation(implementation)
    n = -(-len(wavs[0]) // 320)
    reference = np.stack([a[0, :, len(prompt) - 1 :, :n].numpy() for a in out.cross_attentions])
    np.testing.assert_allclose(ours, reference / reference.sum(-1, keepdims=True), atol=1e-5)


def test_align_responses_matches_align_response(models):
    model, processor, tokenizer = models
    texts, wavs, _ = _three_responses(processor)
    batched = align.align_responses(model, processor, tokenizer, wavs, texts, batch_size=2, window="audio")
    for wav, text, out in zip(wavs, texts, batched):
        alone = align.align_response(model, processor, tokenizer, wav, text, window="audio")
        assert out["llm_token_spans"] == alone["llm_token_spans"] and out["pauses"] == alone["pauses"]
        align.check_spans(out["llm_token_spans"], out["n_frames"])

