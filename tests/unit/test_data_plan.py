from collections import Counter

from emo_lib import corpus, data
from emo_lib.presets import load_preset


def plan(name="cpu", **overrides):
    return data.plan_pairs(load_preset(name, overrides))


def test_splits_hold_out_whole_speakers_and_sentences():
    pairs = plan()
    heldout = set(load_preset("cpu")["data"]["heldout_speakers"])
    train_like = [p for p in pairs if p["split"] in ("train", "val")]
    test = [p for p in pairs if p["split"] == "test"]
    assert test and train_like
    for p in train_like:
        assert p["query_speaker"] not in heldout and p["response_speaker"] not in heldout
    for p in test:
        assert p["query_speaker"] in heldout and p["response_speaker"] in heldout
    train_sentences = {p["same_text_id"] for p in train_like if p["same_text_id"]}
    test_sentences = {p["same_text_id"] for p in test if p["same_text_id"]}
    assert test_sentences and not (train_sentences & test_sentences)


def test_heldout_same_text_sentences_have_every_emotion():
    pairs = [p for p in plan() if p["source"] == "same_text" and p["split"] == "test"]
    by_sentence = Counter(p["same_text_id"] for p in pairs)
    for sentence in by_sentence:
        emotions = {p["query_emotion"] for p in pairs if p["same_text_id"] == sentence}
        assert emotions == set(corpus.EMOTIONS)


def test_plan_is_reproducible_and_seed_dependent():
    a, b = plan(), plan()
    assert a == b
    c = plan(seed=1)
    assert [p["query_speaker"] for p in a] != [p["query_speaker"] for p in c]


def test_cpu_preset_plans_enough_pairs():
    pairs = plan()
    usable = [p for p in pairs if p["kept"]]
    assert len(usable) >= 2400  # room for the ASR filter to keep >= 2000
    assert {p["response_emotion"] for p in usable} <= set(corpus.EMOTIONS)
    assert 0.05 < sum(p["word_by_word"] for p in usable) / len(usable) < 0.25


def test_smoke_plan_is_small():
    assert len(plan("smoke")) < 150


def test_dataset_metrics_counts_reasons():
    rows = [
        {"kept": True, "drop_reason": None, "split": "train", "query_emotion": "anger", "query_wer": 0.0,
         "response_wer": 0.1, "query_duration_s": 2.0, "response_duration_s": 3.0,
         "query_acoustics": {"f0_mean_hz": 150.0, "f0_range_semitones": 5.0, "rate_words_per_s": 3.0, "energy_db": -20.0}},
        {"kept": False, "drop_reason": "query_wer", "split": "train", "query_emotion": "anger", "query_wer": 0.8,
         "response_wer": 0.0, "query_duration_s": 2.0, "response_duration_s": 3.0, "query_acoustics": None},
    ]
    m = data.dataset_metrics(rows)
    assert m["pairs_kept"] == 1 and m["pairs_dropped_by_reason"]["query_wer"] == 1
    assert m["by_emotion"]["anger"]["median_query_asr_wer"] == 0.4
    assert m["by_emotion"]["anger"]["mean_f0_hz"] == 150.0
    assert m["by_emotion"]["sadness"]["mean_f0_hz"] is None


def test_a_query_text_never_crosses_splits():
    pairs = [p for p in plan() if p["source"] == "domain"]
    splits: dict[str, set] = {}
    for p in pairs:
        splits.setdefault(p["query_text"], set()).add("test" if p["split"] == "test" else "train")
    assert all(len(s) == 1 for s in splits.values())
    assert max(Counter(p["query_text"] for p in pairs).values()) == 2  # some queries have two voices


def test_emotion_filter_drops_confident_mismatches_only():
    rows = [
        {"pair_id": "a", "kept": True, "query_emotion": "anger", "response_emotion": "sadness", "ser_query_label": None},
        {"pair_id": "b", "kept": True, "query_emotion": "anger", "response_emotion": "sadness", "ser_query_label": None},
        {"pair_id": "c", "kept": True, "query_emotion": "fear", "response_emotion": "neutral", "ser_query_label": None},
        {"pair_id": "d", "kept": False, "query_emotion": "fear", "response_emotion": "neutral", "ser_query_label": None},
    ]
    predictions = {("a", "query"): ("anger", 0.99), ("a", "response"): ("sadness", 0.7),
                   ("b", "query"): ("happiness", 0.95), ("b", "response"): ("sadness", 0.9),
                   ("c", "query"): ("surprise", 0.5), ("c", "response"): ("neutral", 0.9)}
    counts = data.apply_emotion_filter(rows, predictions, min_confidence=0.9)
    assert [r["kept"] for r in rows] == [True, False, True, False]
    assert rows[1]["drop_reason"] == "ser_mismatch" and rows[2]["ser_query_label"] == "surprise"
    assert counts["dropped_pairs"] == 1 and counts["checked_pairs"] == 3
    # a re-run of notebook 02 starts from the pairs before the filter
    assert data.reset_emotion_filter(rows) == 1
    assert [r["kept"] for r in rows] == [True, True, True, False] and rows[1]["drop_reason"] is None
    assert all(r["ser_query_label"] is None and r["ser_response_confidence"] is None for r in rows)
