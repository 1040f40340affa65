"""Emotion strength at inference: does moving stage 1's plan further from the average make its emotion heard?

    OMP_NUM_THREADS=2 python benchmarks/emotion_strength.py --run runs/cpu --strength 1 1.5 2
    OMP_NUM_THREADS=2 python benchmarks/emotion_strength.py --run runs/cpu --strength 1 --prosody-temperature 0 0.7 1

Notebook 06 speaks held-out replies end to end and asks the kit's emotion encoder which emotion it
hears. The stage-2 decoder reads stage 1's emotion plan standardised with its training statistics,
z = (e - mean) / std (``DecoderBase.emotion_condition``). ``synthesis.emotion_strength`` s scales
that at inference, z -> s z: s = 1 is the plan as is, s > 1 an exaggerated one (further from the
average plan), s = 0 the average plan. Nothing is trained again.

The script takes notebook 06's seeded choice of held-out test queries, lets stage 1 answer them once
(``experiments.held_out_replies``), then for each strength speaks every reply with the run's decoder,
token2mel (seeded noise, as notebook 06) and HiFi-GAN, and reports Whisper WER against the reply text,
the emotion heard against the intended reply emotion (95 % bootstrap interval), the paired change
against s = 1, and "emotion heard = plan" (the plan read by ``pipeline.fit_plan_reader``). At s = 1
the figures are notebook 06's end-to-end ones (up to float rounding).

``--prosody-temperature`` T (an experiment, not a library option): the decoder picks each frame's pitch and
energy token as the most likely bin (T = 0, what the kit does), or samples it from the softmax of its logits / T
(seeded); unit tokens stay greedy. The most likely bin of every frame is a flattened contour; sampling asks
whether the lost variation is what the emotion encoder misses.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from emo_lib.report import machine_line, text_table


def paired_difference(a: list[float], b: list[float], seed: int, n_resamples: int = 1000) -> tuple[float, float, float]:
    """Mean of b - a over the same items with a 95 % bootstrap interval (items resampled together)."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    means = [float(diff[rng.integers(0, len(diff), len(diff))].mean()) for _ in range(n_resamples)]
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def prosody_sampler(temperature: float, generator):
    """A stand-in for ``SpeechDecoder._choose_tokens``: greedy units, pitch and energy sampled at ``temperature``."""
    import torch

    def pick(logits: dict, skip: int = 0) -> dict:
        out = {"units": logits["unit_logits"][0, skip:].argmax(-1)}
        for key, name in (("pitch", "pitch"), ("energy", "energy")):
            probs = torch.softmax(logits[f"{name}_logits"][0, skip:].float() / temperature, dim=-1)
            out[key] = torch.multinomial(probs, 1, generator=generator)[:, 0] if len(probs) else probs.argmax(-1)
        return out

    return pick


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder after notebook 06, e.g. runs/cpu")
    parser.add_argument("--preset", default=None, help="preset of the run (default: from its metrics.json)")
    parser.add_argument("--strength", type=float, nargs="+", default=[1.0, 1.5, 2.0],
                        help="emotion strengths to compare (1 = the plan as is)")
    parser.add_argument("--replies", type=int, default=None, help="held-out replies (default: synthesis.eval_replies)")
    parser.add_argument("--voice", default=None, help="reply voice (a training speaker; default: synthesis.voice)")
    parser.add_argument("--pitch-decoding", nargs="+", default=["voicing_first"],
                        help="pitch-token rules to compare (decoder.pick_pitch): voicing_first (the kit's default), argmax")
    parser.add_argument("--prosody-temperature", type=float, nargs="+", default=[0.0],
                        help="sample pitch and energy tokens at these temperatures (0 = greedy, the kit's choice)")
    args = parser.parse_args(argv)

    import torch

    from emo_lib import asr, data, encoders, evaluate, experiments, llm, pipeline, pretrained
    from emo_lib import decoder as D
    from emo_lib import token2wav as T2W
    from emo_lib.audio import estimate_f0, resample
    from emo_lib.session import seed_everything

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import open_run  # the same run/preset resolution

    run, cfg = open_run(args.run, args.preset)
    seed_everything(cfg["seed"])
    print(machine_line())
    print(f"run {run.root} | preset {cfg.name} | torch threads {torch.get_num_threads()}")
    needed = {name: run.checkpoint_dir(name) / "latest.pt" for name in ("stage1", "stage2", "token2mel", "emotion_encoder")}
    for name, path in needed.items():
        run.require(path, name)
    backbone, tokenizer = pretrained.load_llm(cfg["models"]["llm"])
    stage1 = llm.load_stage1(needed["stage1"], "cpu", backbone, tokenizer)
    decoder = D.load_decoder(needed["stage2"])
    token2mel = T2W.load_token2mel(needed["token2mel"], temperature=cfg["token2mel"]["temperature"])
    vocoder = T2W.Vocoder.from_preset(cfg)
    syn = cfg["synthesis"]
    voice = pipeline.run_voice(run, args.voice or syn["voice"], cfg["token2mel"]["reference_min_s"])
    print(f"reply voice: {args.voice or syn['voice']}")
    rows = data.load_manifest(run)
    started = time.perf_counter()
    replies = experiments.held_out_replies(run, cfg, stage1, args.replies or syn["eval_replies"])
    print(f"{len(replies)} non-empty stage-1 replies in {time.perf_counter() - started:.0f} s")
    recognizer = asr.load_asr(cfg["models"]["whisper"])
    emotion_model = encoders.load_emotion_encoder(needed["emotion_encoder"])
    plans = pipeline.fit_plan_reader(run, rows, seed=cfg["seed"]).predict([r["emotion"] for r in replies])
    intended = [r["intended_emotion"] for r in replies]

    table, baseline, confusions = [], None, {}
    settings = [(s, t, p) for p in args.pitch_decoding for t in args.prosody_temperature for s in args.strength]
    for strength, temperature, pitch_rule in settings:
        decoder.emotion_strength = strength
        decoder.pitch_decoding = pitch_rule
        if temperature > 0:
            decoder._choose_tokens = prosody_sampler(temperature, torch.Generator().manual_seed(cfg["seed"]))
        else:
            decoder.__dict__.pop("_choose_tokens", None)  # the class's choice (pitch: decoder.pitch_decoding)
        label = f"{strength:g}" + (f", T {temperature:g}" if temperature > 0 else "") + \
            (f", {pitch_rule}" if len(args.pitch_decoding) > 1 else "")
        started = time.perf_counter()
        wavs = [experiments.speak(decoder, token2mel, vocoder, voice, r, seed=cfg["seed"])[0] for r in replies]
        spoken = [i for i, w in enumerate(wavs) if len(w)]
        heard = recognizer.transcribe([wavs[i] for i in spoken], sr=T2W.SAMPLE_RATE)
        wer = [asr.word_error_rate(replies[i]["text"], h) for i, h in zip(spoken, heard)]
        recognized, _ = encoders.predict_emotions(emotion_model, [resample(wavs[i], T2W.SAMPLE_RATE, 16000) for i in spoken])
        correct = [float(e == intended[i]) for e, i in zip(recognized, spoken)]
        ci = evaluate.accuracy_with_ci(list(recognized), [intended[i] for i in spoken], seed=cfg["seed"])
        said = float(np.mean([e == plans[i] for e, i in zip(recognized, spoken)]))
        if baseline is None:
            baseline = (label, dict(zip(spoken, correct)))
        common = [i for i in spoken if i in baseline[1]]
        change = paired_difference([baseline[1][i] for i in common], [dict(zip(spoken, correct))[i] for i in common],
                                   cfg["seed"])
        confusions[label] = {}
        for e, i in zip(recognized, spoken):
            confusions[label].setdefault(intended[i], {}).setdefault(e, 0)
            confusions[label][intended[i]][e] += 1
        table.append([label, f"{len(spoken)}", f"{np.mean(wer):.3f}",
                      f"{ci['accuracy']:.3f} [{ci['low']:.2f}, {ci['high']:.2f}]",
                      f"{change[0]:+.3f} [{change[1]:+.2f}, {change[2]:+.2f}]", f"{said:.3f}",
                      f"{time.perf_counter() - started:.0f}"])
        voicing = float(np.mean([np.mean(np.isfinite(estimate_f0(wavs[i], T2W.SAMPLE_RATE))) for i in spoken]))
        table[-1].insert(3, f"{voicing:.3f}")
        print(f"strength {label}: WER {np.mean(wer):.3f}, emotion heard {ci['accuracy']:.3f}, heard = plan {said:.3f}, "
              f"voiced frames {voicing:.3f}", flush=True)
    majority = max(intended.count(e) for e in set(intended)) / len(intended)
    plan_ok = float(np.mean([p == t for p, t in zip(plans, intended)]))
    print(f"\n{len(replies)} held-out replies of {run.root}; the plan names the intended emotion in {plan_ok:.3f}; "
          f"majority rate {majority:.3f}")
    print(text_table(["strength (, prosody temperature, pitch rule)", "spoken", "Whisper WER", "voiced frames", "emotion heard [95 % CI]",
                      f"change vs strength {baseline[0]} [95 % CI]", "heard = plan", "seconds"], table))
    for label, matrix in confusions.items():
        print(f"\nstrength {label}: intended -> heard")
        for emotion, counts in sorted(matrix.items()):
            print(f"  {emotion:10s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
