"""Word-boundary error of the alignment on word-by-word responses (exact boundaries known).

    OMP_NUM_THREADS=2 python benchmarks/align_accuracy.py runs/smoke runs/cpu --limit 60
    OMP_NUM_THREADS=2 python benchmarks/align_accuracy.py runs/smoke --no-gaps

Word-by-word responses are synthesized one word at a time, so every word's start and end is
known exactly (``response_word_boundaries`` in the manifest). Whisper runs once per response;
the methods below reuse its cross-attention:

- proportional: the speech region cut in proportion to word lengths (no alignment);
- attention DTW: DTW on -attention only (Whisper's word-timestamp recipe), heads as given;
- pause-aware DTW: the kit's default (``align_response``): pause rows between words, pauses cut
  from the word edges;
- silence only (control): pause-aware DTW with the attention set to zero. Word-by-word speech
  has a silence between every two words, so counting silences alone does well here; the gap
  between this control and the pause-aware DTW is what the attention adds.

``--no-gaps`` re-synthesizes the same texts word by word with no gap and no pauses between
words: silence then says nothing about where words meet, and only the attention can.
All methods are clipped to the speech region (``emo_lib.audio.speech_bounds``), as the baseline is.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def responses(run: Path, limit: int) -> list[dict]:
    from emo_lib.paths import read_jsonl

    manifest = run / "data" / "manifest.jsonl"
    if not manifest.exists():
        print(f"{run}: no manifest yet, skipped")
        return []
    rows = [r for r in read_jsonl(manifest) if r.get("response_word_boundaries")]
    return [dict(r, run=run) for r in rows[:limit]]


def speech(row: dict, no_gaps: bool) -> tuple[np.ndarray, list]:
    from emo_lib import tts
    from emo_lib.audio import load_audio, resample

    if not no_gaps:
        wav, _ = load_audio(row["run"] / row["response_wav"], target_sr=16000)
        return wav, row["response_word_boundaries"]
    prosody = dict(row["response_prosody"], comma_pause_ms=0.0, hesitation=0.0)
    wav, truth = tts.synthesize_word_by_word(row["response_text"], row["response_speaker"], prosody, gap_ms=0.0)
    return resample(wav, tts.SAMPLE_RATE, 16000), truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=60, help="word-by-word responses per run")
    parser.add_argument("--heads", default="last3", help="'last3', 'all', 'alignment', ...")
    parser.add_argument("--window", default="full", choices=["full", "audio"])
    parser.add_argument("--no-gaps", action="store_true", help="re-synthesize without gaps or pauses")
    args = parser.parse_args()

    from emo_lib import align
    from emo_lib.asr import load_whisper
    from emo_lib.audio import speech_bounds
    from emo_lib.pretrained import load_llm

    model, processor = load_whisper()
    _, tokenizer = load_llm()
    align.warm_up_dtw()
    heads = align.select_heads(model, args.heads)
    rows = [r for run in args.runs for r in responses(run, args.limit)]
    methods = ["proportional", "attention DTW", "pause-aware DTW", "silence only (control)"]
    errors: dict[tuple[str, str], list[float]] = {}
    start_time = time.perf_counter()
    for row in rows:
        text = row["response_text"]
        wav, truth = speech(row, args.no_gaps)
        ids, char_spans = align.whisper_text_tokens(processor.tokenizer, text)
        weights = align.cross_attention_weights(model, processor, wav, ids, window=args.window)
        attention = align.alignment_matrix(weights, heads)
        char_spans = char_spans + [(len(text), len(text))]
        silence = align.silence_probability(wav, attention.shape[1])
        a, b = speech_bounds(wav, 16000)
        region = (a / 16000, b / 16000)
        predicted = {"proportional": align.proportional_word_boundaries(text, *region)}
        for name, att, weight in [("attention DTW", attention, 0.0), ("pause-aware DTW", attention, 8.0),
                                  ("silence only (control)", np.zeros_like(attention), 8.0)]:
            out = align.align_attention(att, char_spans, text, tokenizer, silence, weight)
            align.check_spans(out["llm_token_spans"], out["n_frames"])
            predicted[name] = align.word_boundaries_from_spans(text, tokenizer, out["llm_token_spans"],
                                                               speech_region_s=region, pauses=out["pauses"])
        for name in methods:
            error = align.boundary_error_ms(predicted[name], truth)
            for group in (f"{row['run'].name}", f"{row['run'].name}/{row['split']}", "all"):
                errors.setdefault((group, name), []).append(error)
    elapsed = time.perf_counter() - start_time

    setting = "re-synthesized without gaps or pauses" if args.no_gaps else "as in the manifest"
    print(f"\nword-boundary error (ms, mean over responses of the mean |error| of starts and ends); "
          f"speech {setting}; heads {args.heads}, window {args.window}; {len(rows)} responses, {elapsed:.0f} s")
    groups = sorted({g for g, _ in errors}, key=lambda g: (g == "all", g))
    print(f"{'responses':<16}{'n':>4}" + "".join(f"{m:>24}" for m in methods))
    for group in groups:
        base = np.mean(errors[(group, "proportional")])
        cells = [f"{np.mean(errors[(group, m)]):9.1f} ({np.mean(errors[(group, m)]) / base:4.2f}x)" for m in methods]
        print(f"{group:<16}{len(errors[(group, methods[0])]):>4}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
