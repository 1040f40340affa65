"""Where is the reply's emotion lost? Emotion heard and Whisper WER at each link of the speech chain.

    OMP_NUM_THREADS=2 python benchmarks/emotion_chain.py --run runs/cpu
    OMP_NUM_THREADS=2 python benchmarks/emotion_chain.py --run runs/cpu --replies 80

Notebook 06 reports one number for the spoken replies: the share of them in which the kit's emotion
encoder hears the intended reply emotion. That number is the product of several links, each of
which can lose the emotion. This script follows the same validation replies (training voices,
utterances no model was trained on) through the chain, one link more at a time:

1. ``recording``: the reply as espeak-ng spoke it (what the emotion encoder was trained on);
2. ``recording -> mel -> HiFi-GAN``: its own 80-band mel through the packaged vocoder;
3. ``true tokens -> token2mel -> HiFi-GAN``: its true speech tokens (units, pitch, energy) through
   token2mel with the reply voice's reference, as notebook 05 resynthesizes;
4. ``decoder (stage-1 plan) -> token2mel -> HiFi-GAN``: the tokens the stage-2 decoder writes from
   stage 1's teacher-forced hidden states and its emotion plan (``stage2/states_*.npy``, as in
   notebook 06's validation), with predicted durations and the preset's pitch rule.

Link 4 differs from notebook 06's end-to-end figure in two ways: stage 1 reads the reference reply
(teacher forcing) instead of writing its own, and the voices are the replies' own. For each link it
prints the Whisper WER against the reply text, the emotion heard with a 95 % bootstrap interval,
the paired change from the previous link, and per intended emotion the share heard right and what
the rest was heard as. Nothing is trained.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from emo_lib.report import machine_line, text_table

LINKS = ("recording", "recording -> mel -> HiFi-GAN", "true tokens -> token2mel -> HiFi-GAN",
         "decoder (stage-1 plan) -> token2mel -> HiFi-GAN")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder after notebook 06, e.g. runs/cpu")
    parser.add_argument("--preset", default=None, help="preset of the run (default: from its metrics.json)")
    parser.add_argument("--replies", type=int, default=40, help="validation replies followed through the chain")
    parser.add_argument("--links", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4],
                        help="which links to run (e.g. --links 4 to compare two runs' decoders)")
    args = parser.parse_args(argv)

    import torch

    from emo_lib import asr, data, encoders, experiments, pipeline
    from emo_lib import decoder as D
    from emo_lib import token2wav as T2W
    from emo_lib.audio import load_audio, resample
    from emo_lib.session import seed_everything
    from emo_lib.store import FrameStore

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from token2mel_temperature import emotion_confusion  # per true emotion: share heard right, heard instead
    from train_throughput import open_run  # the same run/preset resolution

    run, cfg = open_run(args.run, args.preset)
    seed = cfg["seed"]
    seed_everything(seed)
    print(machine_line())
    print(f"run {run.root} | preset {cfg.name} | torch threads {torch.get_num_threads()}")
    needed = {name: run.checkpoint_dir(name) / "latest.pt" for name in ("stage2", "token2mel", "emotion_encoder")}
    for name, path in needed.items():
        run.require(path, name)
    rows = data.load_manifest(run)
    by_id = {r["pair_id"]: r for r in rows}
    voices = pipeline.run_voices(run, ("train", "val"), cfg["token2mel"]["reference_min_s"])
    items, _ = D.load_stage2_items(run, rows, ("val",), cfg["stage2"]["max_frames"], voices)
    if not items:
        raise SystemExit(f"no validation reply of {run.root} has stage-1 states and tokens: run notebook 06 first")
    chosen = np.random.default_rng(seed).choice(len(items), size=min(args.replies, len(items)), replace=False)
    items = [items[i] for i in sorted(chosen.tolist())]
    texts = [by_id[x["pair_id"]]["response_text"] for x in items]
    truth = [by_id[x["pair_id"]]["response_emotion"] for x in items]
    mels = FrameStore(run.require(run.root / "tokens" / "mels.npy", "speech_tokens"))
    decoder = D.load_decoder(needed["stage2"]).eval()
    decoder.pitch_decoding = cfg["synthesis"]["pitch_decoding"]
    token2mel = T2W.load_token2mel(needed["token2mel"], temperature=cfg["token2mel"]["temperature"])
    vocoder = T2W.Vocoder.from_preset(cfg)
    recognizer = asr.load_asr(cfg["models"]["whisper"])
    emotion_model = encoders.load_emotion_encoder(needed["emotion_encoder"])

    def from_tokens(units, pitch, energy, speaker) -> np.ndarray:
        with torch.inference_mode():
            mel = token2mel.sample(torch.as_tensor(units), torch.as_tensor(pitch), torch.as_tensor(energy),
                                   torch.as_tensor(speaker), generator=torch.Generator().manual_seed(seed))[0]
            return vocoder(mel)

    def decoded(x) -> np.ndarray:
        with torch.inference_mode():
            out = decoder.generate(torch.as_tensor(x["hidden"]), torch.as_tensor(x["embeds"]),
                                   torch.as_tensor(x["emotion_pred"]), speaker=torch.as_tensor(x["speaker"]))
        return from_tokens(out["units"], out["pitch"], out["energy"], x["speaker"])

    makers = {
        LINKS[0]: lambda x: load_audio(run.root / by_id[x["pair_id"]]["response_wav"], T2W.SAMPLE_RATE)[0],
        LINKS[1]: lambda x: vocoder(torch.as_tensor(mels[f"{x['pair_id']}_r"]).T.contiguous()),
        LINKS[2]: lambda x: from_tokens(x["units"], x["pitch"], x["energy"], x["speaker"]),
        LINKS[3]: decoded,
    }
    links = [LINKS[i - 1] for i in sorted(set(args.links))]
    table, correct, by_emotion = [], {}, {}
    for link in links:
        make = makers[link]
        started = time.perf_counter()
        wavs = [make(x) for x in items]
        heard = recognizer.transcribe(wavs, sr=T2W.SAMPLE_RATE)
        wer = experiments.per_item_ci([asr.word_error_rate(t, h) for t, h in zip(texts, heard)], seed=seed)
        recognized, _ = encoders.predict_emotions(emotion_model, [resample(w, T2W.SAMPLE_RATE, 16000) for w in wavs])
        correct[link] = [float(r == t) for r, t in zip(recognized, truth)]
        ci = experiments.per_item_ci(correct[link], seed=seed)
        previous = list(correct)[-2] if len(correct) > 1 else None
        change = "" if previous is None else "{mean:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]".format(
            **experiments.paired_difference(correct[link], correct[previous], seed=seed))  # link minus previous
        table.append([link, f"{wer['mean']:.3f} [{wer['ci'][0]:.2f}, {wer['ci'][1]:.2f}]",
                      f"{ci['mean']:.3f} [{ci['ci'][0]:.2f}, {ci['ci'][1]:.2f}]", change or "-",
                      f"{time.perf_counter() - started:.0f}"])
        _, confusion = emotion_confusion(truth, list(recognized))
        by_emotion[link] = {emotion: f"{share} of {n}" + ("" if instead == "-" else f"; {instead}")
                            for emotion, n, share, instead in confusion}
        print(f"{link}: WER {wer['mean']:.3f}, emotion heard {ci['mean']:.3f}", flush=True)
    counts = {e: truth.count(e) for e in sorted(set(truth))}
    print(f"\n{len(items)} validation replies of {run.root} ({', '.join(f'{e} {n}' for e, n in counts.items())}); "
          f"reply voices: their own; pitch rule: {decoder.pitch_decoding}")
    print(text_table(["link", "Whisper WER [95 % CI]", "emotion heard [95 % CI]", "change vs the link above",
                      "seconds"], table))
    print("\nper intended emotion: share heard right; what the rest was heard as")
    print(text_table(["intended"] + [f"link {LINKS.index(link) + 1}" for link in links],
                     [[e] + [by_emotion[link][e] for link in links] for e in counts]))
    print("links: " + "; ".join(f"{LINKS.index(link) + 1} = {link}" for link in links))
    return 0


if __name__ == "__main__":
    sys.exit(main())
