"""token2mel's sampling temperature and step count: Whisper WER and emotion heard of resynthesized speech.

    OMP_NUM_THREADS=2 python benchmarks/token2mel_temperature.py --run runs/cpu --split val
    OMP_NUM_THREADS=2 python benchmarks/token2mel_temperature.py --run runs/cpu --split test --setting 1:10 --setting 0:10
    OMP_NUM_THREADS=2 python benchmarks/token2mel_temperature.py --run runs/cpu --split test --setting 0:10 --utterances 70 --by-emotion
    OMP_NUM_THREADS=2 python benchmarks/token2mel_temperature.py --run runs/cpu --split test --setting 0:10 --vocoder-precision float32 bfloat16

Notebook 05 resynthesizes held-out utterances from their true speech tokens (token2mel + the packaged
HiFi-GAN) and asks Whisper tiny.en what was said. This script repeats that round trip on a run's
trained token2mel for several *sampling* settings, without retraining: the temperature that scales
the starting noise (x0 = mu + temperature * source_std * noise) and the number of Euler steps
(0 = the prior mean mel mu alone, no flow). Choose on ``--split val`` (utterances of training
voices the model was not trained on), report on ``--split test`` (held-out voices), as docs/findings.md
does. Utterances are chosen as in notebook 05 (up to 8 s, a seeded choice, a reference from another
utterance of the same voice); the noise of utterance i is seeded with seed + i, so settings differ
only in what they set. ``--vocoder-precision`` vocodes the same mels with HiFi-GAN in float32 and/or
bfloat16 (``synthesis.vocoder_precision``): what the faster vocoder costs in words and emotion.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from emo_lib import asr, encoders
from emo_lib import speech_tokens as S
from emo_lib import token2wav as T2W
from emo_lib.audio import resample
from emo_lib.report import machine_line, text_table
from emo_lib.store import FrameStore


def parse_setting(text: str) -> tuple[float, int]:
    """'0.5:10' -> (temperature 0.5, 10 steps); steps 0 means the prior mean mel alone."""
    try:
        temperature, steps = text.split(":")
        value = (float(temperature), int(steps))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is TEMPERATURE:STEPS, e.g. 0.5:10, got {text!r}") from None
    if not 0.0 <= value[0] <= 2.0 or value[1] < 0:
        raise argparse.ArgumentTypeError(f"temperature must be in [0, 2] and steps >= 0, got {text!r}")
    return value


def manifest_utterances(run: Path, tokens: FrameStore) -> list[dict]:
    """Every tokenized utterance of the run with its split, text, emotion and speaker (notebook 05's table)."""
    rows = []
    with open(run / "data" / "manifest.jsonl") as f:
        for line in f:
            row = json.loads(line)
            for role, tag in (("query", "q"), ("response", "r")):
                key = f"{row['pair_id']}_{tag}"
                if key in tokens:
                    rows.append({"key": key, "split": row.get("split"), "text": row[f"{role}_text"],
                                 "emotion": row[f"{role}_emotion"], "speaker": row[f"{role}_speaker"]})
    return rows


def choose(utterances: list[dict], references: dict, tokens, split: str, count: int, seed: int) -> list[dict]:
    """Notebook 05's choice: ``count`` utterances of ``split`` with a reference, up to 8 s, seeded, in key order."""
    usable = [u for u in utterances if u["split"] == split and u["key"] in references
              and len(tokens[u["key"]]) <= 8 * S.UNIT_HZ]
    if not usable:
        raise SystemExit(f"no {split} utterance of up to 8 s with a reference")
    keys = np.random.default_rng(seed).choice([u["key"] for u in usable], size=min(count, len(usable)), replace=False)
    by_key = {u["key"]: u for u in usable}
    return [by_key[k] for k in sorted(keys.tolist())]


def emotion_confusion(truth: list[str], heard: list[str]) -> tuple[list[str], list[list]]:
    """Per true emotion: how many utterances, the share heard as that emotion, and what the rest was heard as."""
    header = ["true emotion", "utterances", "heard as itself", "heard instead (count)"]
    rows = []
    for emotion in sorted(set(truth)):
        got = [h for t, h in zip(truth, heard) if t == emotion]
        wrong = {}
        for h in got:
            if h != emotion:
                wrong[h] = wrong.get(h, 0) + 1
        instead = ", ".join(f"{name} {n}" for name, n in sorted(wrong.items(), key=lambda kv: (-kv[1], kv[0])))
        rows.append([emotion, str(len(got)), f"{sum(h == emotion for h in got) / len(got):.2f}", instead or "-"])
    return header, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/cpu", help="a run directory after notebook 05")
    parser.add_argument("--split", default="val", choices=["val", "test"], help="val to choose, test to report")
    parser.add_argument("--utterances", type=int, default=40, help="utterances resynthesized per setting")
    parser.add_argument("--setting", type=parse_setting, action="append",
                        help="TEMPERATURE:STEPS, repeatable (default 1:10 0.5:10 0.25:10 0:10 0:3 0:0)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (notebook 05's choice of utterances)")
    parser.add_argument("--vocoder-precision", nargs="+", default=["float32"], choices=["float32", "bfloat16", "auto"],
                        help="HiFi-GAN precision(s); the same mels are vocoded with each")
    parser.add_argument("--by-emotion", action="store_true",
                        help="also print, per setting, which emotion each true emotion is heard as")
    args = parser.parse_args(argv)
    settings = args.setting or [(1.0, 10), (0.5, 10), (0.25, 10), (0.0, 10), (0.0, 3), (0.0, 0)]
    run = Path(args.run)
    needed = [run / "checkpoints" / "token2mel" / "latest.pt", run / "tokens" / "tokens.npy",
              run / "tokens" / "mels.npy", run / "data" / "manifest.jsonl",
              run / "checkpoints" / "emotion_encoder" / "latest.pt"]
    for path in needed:
        if not path.exists():
            raise SystemExit(f"{path} is missing: run notebooks 01, 02 and 05 for {run} first")
    tokens, mels = FrameStore(needed[1]), FrameStore(needed[2])
    everyone = manifest_utterances(run, tokens)
    vectors = T2W.speaker_vectors({u["key"]: mels[u["key"]] for u in everyone},
                                  min_frames=int(round(1.0 * T2W.SAMPLE_RATE / T2W.HOP)))  # reference_min_s 1.0
    references = T2W.pick_references([u["key"] for u in everyone], [u["speaker"] for u in everyone], set(vectors),
                                     seed=args.seed)
    utterances = choose(everyone, references, tokens, args.split, args.utterances, args.seed)
    model = T2W.load_token2mel(needed[0])
    vocoder = T2W.Vocoder.from_source("packaged:hifigan-universal")
    recognizer = asr.load_asr()
    emotion_model = encoders.load_emotion_encoder(needed[4])
    table = []
    for temperature, steps in settings:
        model.config.temperature = temperature
        started = time.perf_counter()
        mels_out = []
        for i, u in enumerate(utterances):
            frames = torch.as_tensor(tokens[u["key"]])
            ref = torch.as_tensor(vectors[references[u["key"]]])
            noise = torch.randn(1, 80, T2W.mel_frames_for_units(len(frames)),
                                generator=torch.Generator().manual_seed(args.seed + i))
            with torch.inference_mode():
                if steps == 0:
                    mel = model.prior(frames[:, 0], frames[:, 1], frames[:, 2], ref)[0]
                else:
                    mel = model.sample(frames[:, 0], frames[:, 1], frames[:, 2], ref, noise=noise, steps=steps)[0]
            mels_out.append(mel)
        mel_seconds = time.perf_counter() - started
        for precision in args.vocoder_precision:
            vocoder.to("cpu", precision=precision)
            started = time.perf_counter()
            wavs = [vocoder(mel) for mel in mels_out]
            vocoder_seconds = time.perf_counter() - started
            audio_s = sum(len(w) for w in wavs) / T2W.SAMPLE_RATE
            heard = recognizer.transcribe(wavs, sr=T2W.SAMPLE_RATE)
            wer = np.mean([asr.word_error_rate(u["text"], h) for u, h in zip(utterances, heard)])
            recognized, _ = encoders.predict_emotions(emotion_model, [resample(w, T2W.SAMPLE_RATE, 16000) for w in wavs])
            emotion = np.mean([r == u["emotion"] for r, u in zip(recognized, utterances)])
            label = "prior mean mel (no flow)" if steps == 0 else f"{steps} Euler steps"
            table.append([f"{temperature:g}", label, vocoder.precision, f"{wer:.3f}", f"{emotion:.3f}",
                          f"{mel_seconds:.0f}", f"{vocoder_seconds / audio_s:.3f}"])
            print(f"temperature {temperature:g}, {label}, vocoder {vocoder.precision}: WER {wer:.3f}, "
                  f"emotion heard {emotion:.3f}", flush=True)
            if args.by_emotion:
                print(text_table(*emotion_confusion([u["emotion"] for u in utterances], list(recognized))), flush=True)
    print(machine_line())
    print(f"{len(utterances)} {args.split} utterances of {run}, resynthesized from their true tokens")
    print(text_table(["temperature", "mel from", "vocoder", "Whisper WER", "emotion heard", "token2mel seconds",
                      "vocoder RTF (offline)"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
