"""The emotional dialogue dataset: plan pairs, synthesize speech, filter by ASR, write the manifest.

One manifest line per query-response pair (DESIGN.md section 3). Every planned pair stays in the
manifest: ``kept`` says whether later stages use it and ``drop_reason`` says why not, so nothing is
lost silently. Wav paths are relative to the run directory.

Splits hold out whole speakers (``data.heldout_speakers``) and whole same-text sentences: the test
split has no speaker and no same-text sentence that training saw, so its scores measure
generalization. Responses are spoken by speakers of the same split as the query.
"""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import corpus, tts
from .audio import AudioError, load_audio, prosody_summary, save_wav
from .paths import RunDir, read_jsonl, write_jsonl_atomic

DROP_REASONS = ("no_response", "tts_failed", "too_short", "too_long", "query_wer", "response_wer", "ser_mismatch")


def speaker_pools(cfg: dict) -> tuple[list[str], list[str]]:
    heldout = list(cfg["data"]["heldout_speakers"])
    unknown = set(heldout) - set(tts.SPEAKERS)
    if unknown:
        raise ValueError(f"data.heldout_speakers has unknown speakers {sorted(unknown)}; known: {', '.join(tts.SPEAKERS)}")
    train = [s for s in tts.SPEAKERS if s not in heldout]
    return train, heldout


def plan_pairs(cfg: dict, data_folder: Path | None = None) -> list[dict]:
    """Every pair of the preset, with split, speakers, texts and prosody, before any audio exists."""
    d = cfg["data"]
    rng = np.random.default_rng(cfg["seed"])
    train_speakers, heldout_speakers = speaker_pools(cfg)
    responses = corpus.load_responses(data_folder)
    pairs: list[dict] = []

    def add(pair_id, source, domain, text, emotion, query_speaker, split, same_text_id=None):
        reply = responses.get(corpus.response_key(text, emotion))
        pool = heldout_speakers if split == "test" else train_speakers
        response_speaker = str(rng.choice(pool))
        response_emotion = corpus.RESPONSE_EMOTION[emotion][0]
        pairs.append({
            "pair_id": pair_id, "split": split, "source": source, "domain": domain,
            "same_text_id": same_text_id,
            "query_text": text, "query_emotion": emotion, "query_speaker": query_speaker,
            "query_prosody": tts.sample_prosody(emotion, rng, d["jitter"]),
            "response_text": reply["response_text"] if reply and not reply["problem"] else None,
            "response_emotion": response_emotion, "response_speaker": response_speaker,
            "response_prosody": tts.sample_prosody(response_emotion, rng, d["jitter"]),
            "word_by_word": bool(rng.random() < d["word_by_word_fraction"]),
        })

    # domain queries: a random subset per (domain, emotion) cell, each said by one random speaker
    by_cell: dict[tuple, list[dict]] = {}
    for q in corpus.load_queries(data_folder, d["domains"]):
        by_cell.setdefault((q["domain"], q["emotion"]), []).append(q)
    for (domain, emotion), rows in sorted(by_cell.items()):
        n = d["neutral_per_domain"] if emotion == "neutral" else d["queries_per_cell"]
        renditions = d["renditions_per_query"]
        for i in sorted(rng.permutation(len(rows))[:n].tolist()):
            q = rows[i]
            count = int(renditions) + int(rng.random() < renditions - int(renditions))
            first = str(rng.choice(list(tts.SPEAKERS)))
            pool = heldout_speakers if first in heldout_speakers else train_speakers  # one split per text
            others = [s for s in rng.permutation(pool).tolist() if s != first]
            for speaker in [first, *others][:count]:
                split = "test" if speaker in heldout_speakers else "train"
                add(f"{q['id']}-{speaker}", "domain", domain, q["text"], emotion, speaker, split)

    # same-text set: every sentence with every emotion; held-out sentences only by held-out speakers
    sentences = sorted(corpus.load_same_text(data_folder), key=lambda r: r["id"])[: d["same_text_sentences"]]
    n_heldout = int(round(d["heldout_same_text_fraction"] * len(sentences)))
    if len(sentences) >= 2:
        n_heldout = min(max(n_heldout, 1), len(sentences) - 1)
    heldout_ids = set(rng.permutation([s["id"] for s in sentences])[:n_heldout].tolist())
    for s in sentences:
        for emotion in corpus.EMOTIONS:
            if s["id"] in heldout_ids:
                speakers, split = heldout_speakers, "test"
            else:
                speakers = rng.permutation(train_speakers)[: d["same_text_speakers"]].tolist()
                split = "train"
            for speaker in speakers:
                add(f"{s['id']}-{emotion}-{speaker}", "same_text", s["domain"], s["text"], emotion, speaker, split, s["id"])

    # validation: a random share of the training pairs (never test speakers or sentences)
    for pair in pairs:
        if pair["split"] == "train" and rng.random() < d["val_fraction"]:
            pair["split"] = "val"
    for pair in pairs:
        pair.update(kept=True, drop_reason=None)
        if pair["response_text"] is None:
            pair.update(kept=False, drop_reason="no_response")
    return pairs


def _synthesize_one(pair: dict, run: RunDir, d: dict) -> dict:
    """Write the pair's two wavs (skipped when already there: a rerun resumes) and measure them."""
    out = {}
    for role in ("query", "response"):
        rel = f"data/wavs/{pair['pair_id']}_{role[0]}.wav"
        path = run.root / rel
        text, speaker, prosody = pair[f"{role}_text"], pair[f"{role}_speaker"], pair[f"{role}_prosody"]
        boundaries = None
        word_by_word = role == "response" and pair["word_by_word"]
        if word_by_word:
            wav, boundaries = tts.synthesize_word_by_word(text, speaker, prosody)
            save_wav(path, wav, tts.SAMPLE_RATE)
        elif not path.exists():
            save_wav(path, tts.synthesize(text, speaker, prosody), tts.SAMPLE_RATE)
        wav, sr = load_audio(path)
        stats = prosody_summary(wav, sr, len(text.split()))
        out[f"{role}_wav"] = rel
        out[f"{role}_duration_s"] = round(len(wav) / sr, 3)
        out[f"{role}_acoustics"] = {k: round(float(v), 3) for k, v in stats.items()}
        if boundaries is not None:
            out["response_word_boundaries"] = boundaries
    return out


def synthesize_pairs(pairs: list[dict], run: RunDir, cfg: dict, progress: bool = True) -> None:
    """Synthesize every kept pair in parallel espeak-ng processes; failures become drop reasons."""
    from tqdm.auto import tqdm

    d = cfg["data"]
    tts.espeak_binary()  # fail early and clearly when espeak-ng is missing
    run.wavs.mkdir(parents=True, exist_ok=True)
    todo = [p for p in pairs if p["kept"]]

    def work(pair):
        try:
            return pair, _synthesize_one(pair, run, d), None
        except (tts.TTSError, tts.TextError, AudioError) as err:
            return pair, None, str(err)

    with ThreadPoolExecutor(max_workers=max(1, d["tts_workers"])) as pool:
        for pair, result, error in tqdm(pool.map(work, todo), total=len(todo), desc="espeak-ng", disable=not progress):
            if error:
                pair.update(kept=False, drop_reason="tts_failed", tts_error=error)
                continue
            pair.update(result)
            durations = (pair["query_duration_s"], pair["response_duration_s"])
            if min(durations) < d["min_duration_s"]:
                pair.update(kept=False, drop_reason="too_short")
            elif max(durations) > d["max_duration_s"]:
                pair.update(kept=False, drop_reason="too_long")


def asr_filter(pairs: list[dict], run: RunDir, cfg: dict, progress: bool = True) -> None:
    """Transcribe both sides of every kept pair with Whisper and drop pairs above the WER threshold."""
    from .asr import load_asr, word_error_rate

    d = cfg["data"]
    recognizer = load_asr(cfg["models"]["whisper"])
    print(f"ASR filter: {recognizer.description}")
    todo = [p for p in pairs if p["kept"]]
    for role in ("query", "response"):
        wavs = [load_audio(run.root / p[f"{role}_wav"], target_sr=16000)[0] for p in todo]
        texts = recognizer.transcribe(wavs, sr=16000, batch_size=d["asr_batch_size"], progress=progress)
        for p, hyp in zip(todo, texts):
            p[f"{role}_asr_text"] = hyp
            p[f"{role}_wer"] = round(word_error_rate(p[f"{role}_text"], hyp), 4)
    for p in todo:
        if p["query_wer"] > d["wer_threshold"]:
            p.update(kept=False, drop_reason="query_wer")
        elif p["response_wer"] > d["wer_threshold"]:
            p.update(kept=False, drop_reason="response_wer")


MANIFEST_DEFAULTS = {
    "query_wav": None, "response_wav": None, "query_duration_s": None, "response_duration_s": None,
    "query_acoustics": None, "response_acoustics": None, "response_word_boundaries": None,
    "query_asr_text": None, "query_wer": None, "response_asr_text": None, "response_wer": None,
    # reserved for the speech-emotion-recognizer filter that notebook 02 adds
    "ser_query_label": None, "ser_query_confidence": None,
    "ser_response_label": None, "ser_response_confidence": None,
}


def build_dataset(cfg: dict, run: RunDir, progress: bool = True, data_folder: Path | None = None) -> list[dict]:
    """Plan, synthesize, filter and write ``data/manifest.jsonl``; returns the manifest rows."""
    run.make()
    timings = {}
    t0 = time.time()
    pairs = plan_pairs(cfg, data_folder)
    for p in pairs:
        for key, value in MANIFEST_DEFAULTS.items():
            p.setdefault(key, value)
    synthesize_pairs(pairs, run, cfg, progress)
    timings["tts_s"] = round(time.time() - t0, 1)
    t1 = time.time()
    asr_filter(pairs, run, cfg, progress)
    timings["asr_s"] = round(time.time() - t1, 1)
    write_jsonl_atomic(run.manifest, pairs)
    summary = {"pairs_planned": len(pairs), "pairs_kept": sum(p["kept"] for p in pairs), **timings}
    print(f"manifest: {run.manifest} ({summary})")
    return pairs


def apply_emotion_filter(rows: list[dict], predictions: dict, min_confidence: float) -> dict:
    """The paper's speech-emotion-recognizer filter.

    ``predictions`` maps (pair_id, "query"|"response") to (label, confidence). Every kept pair gets
    the recognizer's label and confidence in its ``ser_*`` columns; a pair is dropped
    (``ser_mismatch``) when, for either side, the recognizer hears ANOTHER emotion than intended
    with at least ``min_confidence``. Returns counts.
    """
    dropped = Counter()
    for row in rows:
        if not row["kept"]:
            continue
        for role in ("query", "response"):
            label, confidence = predictions[(row["pair_id"], role)]
            row[f"ser_{role}_label"], row[f"ser_{role}_confidence"] = label, round(float(confidence), 4)
        for role in ("query", "response"):
            if row[f"ser_{role}_label"] != row[f"{role}_emotion"] and row[f"ser_{role}_confidence"] >= min_confidence:
                row.update(kept=False, drop_reason="ser_mismatch")
                dropped[role] += 1
                break
    return {"checked_pairs": sum(1 for r in rows if r["ser_query_label"] is not None),
            "dropped_pairs": sum(dropped.values()), "dropped_for_query": dropped["query"],
            "dropped_for_response": dropped["response"], "kept_pairs": sum(r["kept"] for r in rows)}


def reset_emotion_filter(rows: list[dict]) -> int:
    """Undo ``apply_emotion_filter``: pairs it dropped are kept again and every ``ser_*`` column
    is cleared. Notebook 02 calls it first, so a re-run trains on the same pairs as the first
    run and decides the filter afresh. Returns how many pairs came back."""
    restored = 0
    for row in rows:
        if not row["kept"] and row.get("drop_reason") == "ser_mismatch":
            row.update(kept=True, drop_reason=None)
            restored += 1
        for role in ("query", "response"):
            row[f"ser_{role}_label"] = row[f"ser_{role}_confidence"] = None
    return restored


def save_manifest(run: RunDir, rows: list[dict]) -> None:
    write_jsonl_atomic(run.manifest, rows)


def load_manifest(run: RunDir, kept_only: bool = True, split: str | None = None) -> list[dict]:
    """Manifest rows of a run (stops with the notebook to run when the manifest is missing)."""
    rows = read_jsonl(run.require(run.manifest, "manifest"))
    if kept_only:
        rows = [r for r in rows if r["kept"]]
    if split is not None:
        rows = [r for r in rows if r["split"] == split]
    return rows


def dataset_metrics(rows: list[dict]) -> dict:
    """Headline numbers of notebook 01: counts, drop reasons, WER and acoustics by emotion."""
    kept = [r for r in rows if r["kept"]]
    dropped = Counter(r["drop_reason"] for r in rows if not r["kept"])
    by_emotion: dict[str, dict] = {}
    for emotion in corpus.EMOTIONS:
        group = [r for r in kept if r["query_emotion"] == emotion]
        wers = [r["query_wer"] for r in rows if r["query_emotion"] == emotion and r.get("query_wer") is not None]
        acoustic = lambda key: float(np.nanmean([r["query_acoustics"][key] for r in group])) if group else float("nan")  # noqa: E731
        by_emotion[emotion] = {
            "pairs_kept": len(group),
            "median_query_asr_wer": float(np.median(wers)) if wers else float("nan"),
            "mean_f0_hz": acoustic("f0_mean_hz"),
            "mean_f0_range_semitones": acoustic("f0_range_semitones"),
            "mean_rate_words_per_s": acoustic("rate_words_per_s"),
            "mean_energy_db": acoustic("energy_db"),
        }
    clean = lambda v: None if isinstance(v, float) and not np.isfinite(v) else v  # noqa: E731
    return {
        "pairs_planned": len(rows),
        "pairs_kept": len(kept),
        "pairs_dropped": sum(dropped.values()),
        "pairs_dropped_by_reason": {reason: dropped.get(reason, 0) for reason in DROP_REASONS},
        "kept_by_split": dict(Counter(r["split"] for r in kept)),
        "median_response_asr_wer": float(np.median([r["response_wer"] for r in rows if r.get("response_wer") is not None] or [np.nan])),
        "hours_of_speech": round(sum(r["query_duration_s"] + r["response_duration_s"] for r in kept) / 3600, 3),
        "by_emotion": {e: {k: clean(v) for k, v in m.items()} for e, m in by_emotion.items()},
    }
