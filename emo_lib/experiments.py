"""Ablations and variants: named *arms*, each one preset override away from the paper, trained at one budget.

An **arm** is a name, the stage it changes (1: the speech LLM, 2: the speech decoder), the
preset overrides that make it, and one line saying what it is and where the choice comes from
(the paper, the authors' public code, another paper). Notebook 08 compares the paper with its
own ablation and with the public code's choices; notebook 09 with variants from other papers.
Every arm of a stage is trained from scratch with the *same* number of optimizer steps
(``evaluation.stage1_arm_steps`` / ``stage2_arm_steps``), on the same data, with the same seed,
and evaluated on the same held-out items, so differences come from the arm and from chance only
(the intervals say how much chance).

Adding a variant takes one registered class and one arm::

    @adapters.register_adapter("my_adapter")          # or decoder.register_decoder(...)
    class MyAdapter(nn.Module): ...

    experiments.register_arm("my_adapter", stage=1, overrides={"stage1.adapter": "my_adapter"},
                             what="my idea", origin="variant")

then list ``my_adapter`` in ``evaluation.variants`` (or pass ``--set stage1.adapter=my_adapter``
to run the whole series with it). No notebook changes.

Each arm writes ``runs/<run>/arms/stage<k>-<name>/``: its checkpoint (resumable) and
``result.json``. A finished arm is not retrained when its settings are unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .paths import read_json, write_json_atomic


@dataclass(frozen=True)
class Arm:
    """One compared configuration: ``overrides`` applied to the run's preset."""

    name: str
    stage: int
    overrides: dict = field(default_factory=dict)
    what: str = ""
    origin: str = "ablation"  # paper | public code | ablation | variant


ARMS: dict[int, dict[str, Arm]] = {1: {}, 2: {}}


def register_arm(name: str, stage: int, overrides: dict, what: str, origin: str = "ablation") -> Arm:
    """Add (or replace) an arm of ``stage`` (1 or 2)."""
    if stage not in ARMS:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    for key in overrides:
        if not key.startswith(f"stage{stage}."):
            raise ValueError(f"arm {name!r} of stage {stage} overrides {key!r}; an arm changes its own stage only "
                             f"(keys stage{stage}.*), so that the other stage stays the main run's")
    arm = Arm(name, stage, dict(overrides), what, origin)
    ARMS[stage][name] = arm
    return arm


def get_arm(name: str, stage: int) -> Arm:
    try:
        return ARMS[stage][name]
    except KeyError:
        raise ValueError(f"no stage-{stage} arm named {name!r}; registered: {', '.join(sorted(ARMS[stage]))}") from None


def find_arm(name: str) -> Arm:
    """The arm called ``name`` in either stage (stage 1 first)."""
    for stage in (1, 2):
        if name in ARMS[stage]:
            return ARMS[stage][name]
    raise ValueError(f"no arm named {name!r}; registered: {', '.join(sorted(set(ARMS[1]) | set(ARMS[2])))}")


# The paper, its ablation, the public code's choices (../shared/RESOURCES.md) and two variants.
register_arm("paper", 1, {}, "fused adapter (per-frame concatenation), DTW token-level emotion targets", "paper")
register_arm("interleaved_streams", 1, {"stage1.adapter": "interleaved"},
             "semantic and emotion frames interleaved in time (the sequence doubles)", "public code")
register_arm("utterance_mean_target", 1, {"stage1.emotion_target": "utterance_mean"},
             "one utterance-mean emotion vector as the target of every reply token", "public code")
register_arm("no_emotion_encoder", 1, {"stage1.adapter": "semantic_only"},
             "semantic (Whisper) stream only: no emotion encoder", "ablation")
register_arm("transcribe", 1, {"stage1.transcribe_prob": 0.5},
             "auxiliary transcription task on half of the training queries (the kit's addition, llm.SpeechLLM.transcription_draws)",
             "kit")
register_arm("dual_info", 1, {"stage1.adapter": "dual_info"},
             "Dual-Info SLM: paralinguistic soft prompt + frame-stacking linguistic adapter, equivalence replacement",
             "variant")
register_arm("paper", 2, {}, "sigmoid gate over (h, e), AdaLN on the emotion, linear gt -> predicted schedule", "paper")
register_arm("no_fusion", 2, {"stage2.fusion": "none"},
             "without the fusion module: hidden state only, no gate, no AdaLN (the paper's Table 3)", "ablation")
register_arm("fixed_mix", 2, {"stage2.schedule": "fixed"},
             "fixed 30 % ground-truth / 70 % predicted emotion mix instead of the schedule", "public code")
register_arm("no_voice", 2, {"stage2.speaker": False},
             "without the reply voice's reference: the paper's decoder inputs (its tokens carry no pitch; the kit's do)",
             "ablation")
register_arm("interleaved_decoder", 2, {"stage2.decoder": "interleaved"},
             "OpenS2S-style decoder: read 4 hidden states, write 8 speech tokens, autoregressive", "variant")


def arm_preset(preset: str, base_overrides: dict | None, arm: Arm, steps: int):
    """The preset of ``arm``: the run's preset and overrides, the arm's overrides, the arm budget."""
    from .presets import load_preset

    return load_preset(preset, {**(base_overrides or {}), **arm.overrides, f"stage{arm.stage}.steps": int(steps)})


def arm_folder(run, arm: Arm) -> Path:
    return run.root / "arms" / f"stage{arm.stage}-{arm.name}"


def _cached(folder: Path, settings: dict) -> dict | None:
    path = folder / "result.json"
    if path.exists():
        saved = read_json(path)
        if saved.get("settings") == settings:
            return saved["result"]
    return None


def _settings(arm: Arm, steps: int, extra: dict) -> dict:
    # JSON round trip so that tuples and lists compare equal with what result.json holds
    import json

    return json.loads(json.dumps({"arm": arm.name, "stage": arm.stage, "overrides": arm.overrides, "steps": int(steps),
                                  **extra}))


def model_fingerprint(model) -> str:
    """A CRC32 of a module's weights and buffers (hex): a cached arm result that was scored with
    other frozen models (e.g. a retrained token2mel) must not be reused."""
    import zlib

    import torch

    crc = 0
    for name, tensor in sorted(model.state_dict().items()):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), crc)
    return f"{crc:08x}"


def _open_arm(run, preset, base_overrides, arm, stage: int, steps: int, sizes: dict, progress: bool,
              device: str = "cpu"):
    """An arm's (arm, preset, folder, settings, cached result or None): the shared start of both trainers."""
    arm = get_arm(arm, stage) if isinstance(arm, str) else arm
    cfg = arm_preset(preset, base_overrides, arm, steps)
    folder = arm_folder(run, arm)
    if base_overrides:  # a variant run's arms differ from the default run's (absent when empty: older results stay valid)
        sizes = {**sizes, "base_overrides": dict(base_overrides)}
    if stage == 2:  # spoken replies depend on the pitch rule (an inference setting, not part of the arm's checkpoint)
        sizes = {**sizes, "pitch_decoding": cfg["synthesis"]["pitch_decoding"]}
        from .train import train_precision

        precision = train_precision({"cpu_bf16": cfg["stage2"]["cpu_bf16"]}, device)
        if precision != "float32":  # absent in float32: older results stay valid
            sizes = {**sizes, "train_precision": precision}
    settings = _settings(arm, steps, sizes)
    cached = _cached(folder, settings)
    if cached is not None and progress:
        print(f"stage-{stage} arm {arm.name}: reusing {folder / 'result.json'}")
    return arm, cfg, folder, settings, cached


def per_item_ci(values, seed: int = 0, n_resamples: int = 1000) -> dict:
    """Mean and percentile-bootstrap 95 % interval of per-item values (accuracy 0/1, WER, ...)."""
    from .evaluate import bootstrap_ci

    ci = bootstrap_ci(np.asarray(values, dtype=np.float64), n_resamples=n_resamples, seed=seed)
    return {"mean": ci["mean"], "ci": [ci["low"], ci["high"]], "n": ci["n"]}


def paired_difference(a, b, seed: int = 0, n_resamples: int = 1000) -> dict:
    """Mean of ``a - b`` over the same items, with a paired bootstrap interval (items resampled together)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same items: {a.shape} vs {b.shape}")
    return per_item_ci(a - b, seed, n_resamples)


# ---------------------------------------------------------------------------------------------
# Stage 1 arms: train the speech LLM, score the same-text set and the held-out plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Stage1Data:
    """What every stage-1 arm trains and is scored on (loaded once, shared by the arms)."""

    rows: list
    train: list
    val: list
    test: list
    same_text: list
    same_text_rows: list
    semantic_dim: int
    emotion_dim: int


def load_stage1_data(run, cfg, heldout_examples: int | None = None) -> Stage1Data:
    """Train/val/test stage-1 examples and the held-out same-text set of a run (notebooks 01-03)."""
    from . import data, llm
    from .pretrained import load_llm

    rows = data.load_manifest(run)
    _, tokenizer = load_llm(cfg["models"]["llm"])
    train, _ = llm.load_stage1_examples(run, rows, tokenizer, ("train",))
    val, _ = llm.load_stage1_examples(run, rows, tokenizer, ("val",))
    test, _ = llm.load_stage1_examples(run, rows, tokenizer, ("test",))
    if heldout_examples:
        test = [test[i] for i in sorted(np.random.default_rng(cfg["seed"]).choice(
            len(test), size=min(heldout_examples, len(test)), replace=False))]
    st_rows = [r for r in rows if r["split"] == "test" and r["source"] == "same_text"]
    same_text, _ = llm.load_stage1_examples(run, st_rows, tokenizer, ("test",), require_trajectory=False)
    by_id = {r["pair_id"]: r for r in rows}
    if not train:
        raise ValueError("no stage-1 training examples: run notebooks 01-03 first")
    return Stage1Data(rows, train, val, test, same_text, [by_id[e.pair_id] for e in same_text],
                      train[0].semantic.shape[1], train[0].emotion.shape[1])


def train_stage1_arm(run, preset: str, base_overrides: dict | None, arm: Arm | str, steps: int, data: Stage1Data,
                     judge, device: str = "cpu", progress: bool = True, n_resamples: int = 1000) -> dict:
    """Train one stage-1 arm for ``steps`` steps and score it; returns (and saves) its result.

    Scores: judge accuracy of the replies generated from speech on the same-text set (per
    utterance 0/1, with an interval), the number of distinct replies, held-out teacher-forced
    cross-entropy and the centered trajectory cosine against the *DTW* token targets (the same
    reference for every arm, whatever target the arm trained on), and the training time.
    """
    from . import llm
    from .evaluate import content_score
    from .pretrained import load_llm
    from .session import seed_everything

    arm, cfg, folder, settings, cached = _open_arm(run, preset, base_overrides, arm, 1, steps, {
        "train": len(data.train), "same_text": len(data.same_text), "test": len(data.test)}, progress)
    if cached is not None:
        return cached
    seed_everything(cfg["seed"])
    backbone, tokenizer = load_llm(cfg["models"]["llm"])  # a fresh backbone: LoRA is injected in place
    model = llm.build_speech_llm(llm.config_from_preset(cfg, data.semantic_dim, data.emotion_dim), backbone,
                                 tokenizer).to(device)
    model.set_target_stats(data.train)
    loop = llm.loop_from_preset(cfg)
    # a short budget still gets its full learning rate: warmup at most a fifth of the steps (as for stage 2)
    loop.update(eval_every=steps, checkpoint_every=steps, warmup_steps=min(loop["warmup_steps"], max(1, steps // 5)))
    started = time.perf_counter()
    # no periodic validation here: the held-out scores below are the arm's evaluation (and cost minutes)
    history = llm.train_stage1(model, data.train, [], loop, folder / "checkpoint", progress=progress, device=device)
    training_s = history["seconds"][-1] if history["seconds"] else 0.0
    model.merge_lora()  # eval mode, LoRA folded into the weights: faster scoring and generation
    heldout = llm.evaluate_teacher_forced(model, data.test)
    by_id = {r["pair_id"]: r for r in data.rows}
    listening = llm.listening_test(model, data.test, by_id, seed=cfg["seed"])
    texts = []
    for start in range(0, len(data.same_text), 16):
        texts += [llm.tidy_reply(g["text"]) for g in
                  model.generate(data.same_text[start : start + 16], max_new_tokens=cfg["stage1"]["max_new_tokens"])]
    intended = [r["response_emotion"] for r in data.same_text_rows]
    content = content_score(texts, [r["query_text"] for r in data.same_text_rows])
    judged = judge.predict(texts)
    correct = [float(j == t) for j, t in zip(judged, intended)]
    result = {
        "arm": arm.name, "stage": 1, "origin": arm.origin, "what": arm.what, "overrides": arm.overrides,
        "steps": len(history["step"]), "training_minutes": round(training_s / 60, 2),
        "trainable_parameters": llm.count_trainable(model)["trainable"],
        "same_text_judge_accuracy": per_item_ci(correct, cfg["seed"], n_resamples),
        "same_text_correct": correct, "same_text_replies": texts,
        "same_text_distinct_replies": len(set(texts)),
        "heldout_ce_nats": heldout["ce"], "heldout_centered_cosine": heldout["centered_cosine"],
        "heldout_trajectory_cosine": heldout["trajectory_cosine"],
        "listening_gain_nats": listening["gain"], "listening_ce_true": listening["ce_true"],
        "listening_ce_swapped": listening["ce_swapped"],
        "same_text_content_score": content["mean"], "same_text_content_mismatched": content["mismatched_mean"],
        "first_train_ce": float(np.mean(history["ce"][:3])) if history.get("ce") else None,
        "last_train_ce": float(np.mean(history["ce"][-3:])) if history.get("ce") else None,
        "minutes": round((time.perf_counter() - started) / 60, 2),
    }
    write_json_atomic(folder / "result.json", {"settings": settings, "result": result})
    del model, backbone
    return result


# ---------------------------------------------------------------------------------------------
# Stage 2 arms: train the decoder on the main run's stage-1 states, score teacher-forced and spoken
# ---------------------------------------------------------------------------------------------
@dataclass
class Stage2Data:
    """Decoder training items, validation items and a fixed set of spoken replies (shared by the arms)."""

    items: list
    val_items: list
    kmeans_meta: dict
    replies: list  # stage-1 generations for held-out queries: pair_id, text, intended, hidden, embeds, emotion
    voice: object = None


def shuffled_emotions(items: list, seed: int = 0) -> list:
    """The items with another item's predicted emotion plan (repeated or cut to length): "wrong emotion".

    Every item gets the plan of the item ``shift`` places further (a random rotation), never its own.
    """
    if len(items) < 2:
        raise ValueError("a wrong emotion plan needs at least two items")
    shift = int(np.random.default_rng(seed).integers(1, len(items)))  # a rotation: nobody keeps its own plan
    out = []
    for i, x in enumerate(items):
        other = items[(i + shift) % len(items)]["emotion_pred"]
        reps = int(np.ceil(len(x["durations"]) / len(other)))
        wrong = np.concatenate([other] * reps)[: len(x["durations"])]
        out.append({**x, "emotion_pred": wrong, "emotion_gt": wrong})
    return out


def other_voices(items: list, seed: int = 0) -> list:
    """The items, each with the voice reference (``speaker``) of another of the items' speakers: "wrong voice".

    Voices are told apart by their values; every item gets a seeded choice among the voices that
    are not its own. Needs at least two distinct voices.
    """
    distinct: dict = {}
    for x in items:
        v = np.asarray(x["speaker"], dtype=np.float32)
        distinct.setdefault(v.tobytes(), v)
    if len(distinct) < 2:
        raise ValueError(f"a wrong voice needs at least two distinct voices, got {len(distinct)}")
    rng = np.random.default_rng(seed)
    out = []
    for x in items:
        own = np.asarray(x["speaker"], dtype=np.float32).tobytes()
        others = [v for key, v in distinct.items() if key != own]
        out.append({**x, "speaker": others[int(rng.integers(len(others)))]})
    return out


def held_out_replies(run, cfg, stage1, n: int, device: str = "cpu") -> list[dict]:
    """Stage-1 replies (text, hidden states, embeddings, emotion plan) to ``n`` held-out test queries.

    The same seeded choice of test queries as notebook 06; generated once and shared by every
    stage-2 arm, so arms differ only in how they speak the very same replies.
    """
    import torch

    from . import data, llm

    rows = data.load_manifest(run)
    by_id = {r["pair_id"]: r for r in rows}
    test_rows = [r for r in rows if r["split"] == "test"]
    examples, _ = llm.load_stage1_examples(run, test_rows, stage1.tokenizer, ("test",), require_trajectory=False)
    examples = [examples[i] for i in sorted(np.random.default_rng(cfg["seed"]).choice(
        len(examples), size=min(n, len(examples)), replace=False))]
    replies = []
    for k in range(0, len(examples), 8):
        for example, g in zip(examples[k : k + 8], stage1.generate(examples[k : k + 8],
                                                                   max_new_tokens=cfg["stage1"]["max_new_tokens"])):
            if not g["token_ids"]:
                continue
            with torch.inference_mode():
                embeds = stage1.embed_tokens(torch.tensor(g["token_ids"], device=stage1.device)).float().cpu().numpy()
            r = by_id[example.pair_id]
            replies.append({"pair_id": r["pair_id"], "text": g["text"], "intended_emotion": r["response_emotion"],
                            "hidden": np.asarray(g["hidden"], dtype=np.float32), "embeds": embeds,
                            "emotion": np.asarray(g["emotion"], dtype=np.float32)})
    return replies


MAX_FRAMES_PER_TOKEN = 12  # 0.48 s of speech per text token: about twice the slowest speech in the data


def speak(decoder, token2mel, vocoder, voice, reply: dict, seed: int = 0) -> tuple[np.ndarray, dict]:
    """One reply's decoder outputs -> token2mel (seeded noise) -> HiFi-GAN waveform at 22.05 kHz.

    A decoder that writes more than ``MAX_FRAMES_PER_TOKEN`` speech tokens per text token (an
    autoregressive one that has not learned to stop) is cut there before token2mel, and the
    reply is flagged ``capped``: its audio would be mostly babble and would cost minutes.
    """
    import torch

    with torch.inference_mode():
        started = time.perf_counter()
        speech = decoder.generate(torch.as_tensor(reply["hidden"]), torch.as_tensor(reply["embeds"]),
                                  torch.as_tensor(reply["emotion"]), speaker=voice)
        decoding_s = time.perf_counter() - started
        limit = MAX_FRAMES_PER_TOKEN * len(reply["hidden"])
        capped = len(speech["units"]) > limit
        units, pitch, energy = (speech[k][:limit] for k in ("units", "pitch", "energy"))
        if len(units) == 0:
            return np.zeros(0, dtype=np.float32), {"frames": 0, "decoder_s": decoding_s, "capped": False}
        mel = token2mel.sample(units, pitch, energy, voice, generator=torch.Generator().manual_seed(seed))[0]
        wav = vocoder(mel)
    return wav, {"frames": int(len(units)), "decoder_s": decoding_s, "capped": capped}


def train_stage2_arm(run, preset: str, base_overrides: dict | None, arm: Arm | str, steps: int, data: Stage2Data,
                     synth: dict, device: str = "cpu", progress: bool = True, n_resamples: int = 1000) -> dict:
    """Train one stage-2 arm for ``steps`` steps and score it; returns (and saves) its result.

    ``synth``: ``token2mel``, ``vocoder``, ``voice``, ``recognizer`` (ASR), ``emotion_model`` and
    optionally ``mos`` (a ``quality`` predictor). Scores, all per item with intervals:
    teacher-forced validation accuracy of units / pitch / energy with stage-1's emotion plan and
    with another reply's plan (how much the arm *uses* the emotion); spoken replies (the shared
    held-out set): Whisper WER against the reply text, the emotion encoder's agreement with the
    intended reply emotion, MOS stand-in; decoding speed and how many text tokens the decoder
    needs before its first speech token (latency).
    """
    import torch

    from . import asr, encoders
    from . import decoder as D
    from .audio import resample
    from .session import seed_everything
    from .train import train_loop

    arm, cfg, folder, settings, cached = _open_arm(run, preset, base_overrides, arm, 2, steps, {
        "train": len(data.items), "val": len(data.val_items), "replies": len(data.replies),
        "token2mel": model_fingerprint(synth["token2mel"])}, progress, device)
    if cached is not None:
        return cached
    s2 = cfg["stage2"]
    seed_everything(cfg["seed"])
    first = data.items[0]
    model = D.build_decoder(s2["decoder"], cfg, first["hidden"].shape[1], first["emotion_gt"].shape[1],
                            data.kmeans_meta).to(device)
    model.set_emotion_stats(np.concatenate([x["emotion_gt"] for x in data.items]))
    loop = {"steps": steps, "batch_size": s2["batch_size"], "lr": {"decoder": s2["lr"]},
            "weight_decay": {"decoder": 0.01}, "warmup_steps": min(s2["warmup_steps"], max(1, steps // 5)),
            "eval_every": steps, "checkpoint_every": steps, "seed": cfg["seed"], "cpu_bf16": s2["cpu_bf16"]}
    eval_subset = data.val_items[:64]
    started = time.perf_counter()
    history = train_loop(model, model.parameter_groups(), data.items, D.make_loss_fn(steps, D.schedule_from_preset(s2)),
                         loop, folder / "checkpoint", eval_fn=lambda m: D.evaluate_stage2(m, eval_subset, alpha=1.0),
                         payload_fn=D.checkpoint_payload, lengths=[len(x["units"]) for x in data.items],
                         progress=progress, device=device)
    training_s = history["seconds"][-1] if history["seconds"] else 0.0
    model.eval()
    model.pitch_decoding = cfg["synthesis"]["pitch_decoding"]
    per_item = {"right": [], "wrong": []}
    with torch.inference_mode():
        for kind, items in (("right", data.val_items), ("wrong", shuffled_emotions(data.val_items, cfg["seed"]))):
            for x in items:
                per_item[kind].append(D.evaluate_stage2(model, [x], alpha=1.0, batch_size=1))
    result = {"arm": arm.name, "stage": 2, "origin": arm.origin, "what": arm.what, "overrides": arm.overrides,
              "steps": len(history["step"]), "training_minutes": round(training_s / 60, 2),
              "decoder_parameters": sum(p.numel() for p in model.parameters()),
              "first_unit_after_tokens": int(getattr(model, "first_unit_after_tokens", 0))}
    for name in ("unit", "pitch", "energy"):
        right = [r[f"{name}_accuracy"] for r in per_item["right"]]
        wrong = [r[f"{name}_accuracy"] for r in per_item["wrong"]]
        result[f"val_{name}_accuracy"] = per_item_ci(right, cfg["seed"], n_resamples)
        result[f"val_{name}_accuracy_drop_wrong_emotion"] = paired_difference(right, wrong, cfg["seed"], n_resamples)
    # spoken replies
    wavs, info = [], []
    for k, reply in enumerate(data.replies):
        wav, meta = speak(model, synth["token2mel"], synth["vocoder"], synth["voice"], reply, seed=cfg["seed"] + k)
        wavs.append(wav)
        info.append(meta)
    spoken = [i for i, w in enumerate(wavs) if len(w) > 2205]
    audio_s = sum(len(wavs[i]) / 22050 for i in spoken)
    if spoken:
        heard = synth["recognizer"].transcribe([wavs[i] for i in spoken], sr=22050)
        wer = [asr.word_error_rate(data.replies[i]["text"], h) for i, h in zip(spoken, heard)]
        recognized, _ = encoders.predict_emotions(synth["emotion_model"],
                                                  [resample(wavs[i], 22050, 16000) for i in spoken])
        emotion_ok = [float(e == data.replies[i]["intended_emotion"]) for i, e in zip(spoken, recognized)]
        result["e2e_wer"] = per_item_ci(wer, cfg["seed"], n_resamples)
        result["e2e_emotion_accuracy"] = per_item_ci(emotion_ok, cfg["seed"], n_resamples)
        result["e2e_wer_items"], result["e2e_emotion_items"] = wer, emotion_ok
        if synth.get("mos") is not None:
            from .quality import predict_mos

            scores = predict_mos(synth["mos"], [wavs[i] for i in spoken], 22050)
            result["e2e_mos"] = per_item_ci(scores, cfg["seed"], n_resamples)
        result["decoder_real_time_factor"] = sum(info[i]["decoder_s"] for i in spoken) / max(audio_s, 1e-9)
    result["e2e_spoken"] = len(spoken)
    result["e2e_capped"] = sum(bool(m["capped"]) for m in info)  # replies cut at MAX_FRAMES_PER_TOKEN
    result["e2e_replies"] = len(data.replies)
    result["minutes"] = round((time.perf_counter() - started) / 60, 2)
    out = folder / "wavs"
    from .audio import save_wav

    for i in spoken[:3]:
        save_wav(out / f"{data.replies[i]['pair_id']}.wav", wavs[i], 22050)
    write_json_atomic(folder / "result.json", {"settings": settings, "result": result})
    return result


def summary_row(result: dict) -> dict:
    """The scalar headline numbers of an arm's result, for a side-by-side table (CIs as 'low-high')."""
    row = {"arm": result["arm"], "origin": result["origin"], "what": result["what"]}
    for key, value in result.items():
        if isinstance(value, dict) and "mean" in value:
            row[key] = value["mean"]
            row[f"{key} 95% CI"] = f"{value['ci'][0]:.3f}-{value['ci'][1]:.3f}"
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("stage",):
            row[key] = value
    return row


def metrics_entry(result: dict) -> dict:
    """What goes into metrics.json for an arm: scalars and {mean, ci} pairs, no per-item lists or texts."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict) and "mean" in value:
            out[key] = value["mean"]
            out[f"{key}_ci"] = value["ci"]
        elif isinstance(value, (int, float, str)) or value is None:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The main run, paper-style (notebook 08)
# ---------------------------------------------------------------------------------------------
def judge_scores(judge, replies: dict, intended: list, seed: int = 0, n_resamples: int = 1000) -> dict:
    """Judge accuracy per system ``{name: [reply, ...]}`` on the same items, per item and with intervals."""
    out = {}
    for name, texts in replies.items():
        if len(texts) != len(intended):
            raise ValueError(f"{name}: {len(texts)} replies for {len(intended)} items")
        correct = [float(p == t) for p, t in zip(judge.predict(list(texts)), intended)]
        out[name] = {**per_item_ci(correct, seed, n_resamples), "correct": correct}
    return out


def reference_replies(manifest_rows: list[dict], replies_rows: list[dict]) -> list[str]:
    """The dataset's own reply to each row of ``stage1/same_text_replies.jsonl``.

    Scored by the judge, they give what a model that reproduced the training data perfectly would
    get on that set (a model scores above it only by answering more stereotypically). A row is
    matched by ``pair_id`` when it has one (notebook 04 writes it), otherwise by (sentence, query
    emotion, speaker) among the kept same-text test pairs; a row without exactly one match raises
    ``ValueError``.
    """
    by_id = {r["pair_id"]: r for r in manifest_rows}
    by_key: dict[tuple, list[dict]] = {}
    for r in manifest_rows:
        if r.get("kept", True) and r["split"] == "test" and r["source"] == "same_text":
            by_key.setdefault((r["query_text"], r["query_emotion"], r["query_speaker"]), []).append(r)
    out = []
    for row in replies_rows:
        if row.get("pair_id") in by_id:
            out.append(by_id[row["pair_id"]]["response_text"])
            continue
        key = (row["sentence"], row["query emotion"], row["speaker"])
        found = by_key.get(key, [])
        if len(found) != 1:
            raise ValueError(f"{len(found)} same-text test pairs match {key} in the manifest (expected one): "
                             "rerun notebook 04 on this run's manifest")
        out.append(found[0]["response_text"])
    return out


def emotional_test_replies(run, cfg, stage1, n: int, progress: bool = True) -> dict:
    """Replies of the speech model, the text-only cascade and the oracle to ``n`` emotional test queries.

    The emotional test set: held-out speakers' queries from the 20-domain set (not the same-text
    sentences), a seeded choice of ``n``. The cascade hears Whisper's transcript only (plain
    prompt, the stage-1 system prompt); the oracle gets the transcript and the true query emotion.
    Both are the base backbone with the LoRA adapters switched off. Returns ``rows``,
    ``intended`` (reply emotions) and ``replies`` {system: texts}.
    """
    from . import data, llm

    rows = data.load_manifest(run)
    by_id = {r["pair_id"]: r for r in rows}
    chosen = [r for r in rows if r.get("kept", True) and r["split"] == "test" and r["source"] != "same_text"]
    examples, _ = llm.load_stage1_examples(run, chosen, stage1.tokenizer, ("test",), require_trajectory=False)
    examples = [examples[i] for i in sorted(np.random.default_rng(cfg["seed"]).choice(
        len(examples), size=min(n, len(examples)), replace=False))]
    picked = [by_id[e.pair_id] for e in examples]
    max_new = cfg["stage1"]["max_new_tokens"]
    speech = []
    for start in range(0, len(examples), 16):
        speech += [llm.tidy_reply(g["text"]) for g in stage1.generate(examples[start : start + 16], max_new_tokens=max_new)]
    transcripts = [r["query_asr_text"] for r in picked]
    with stage1.llm.disable_adapter():
        cascade = llm.text_replies(stage1.llm, stage1.tokenizer, transcripts, None, "plain", max_new_tokens=max_new,
                                   progress=progress)
        oracle = llm.text_replies(stage1.llm, stage1.tokenizer, transcripts, [r["query_emotion"] for r in picked],
                                  max_new_tokens=max_new, progress=progress)
    return {"rows": picked, "intended": [r["response_emotion"] for r in picked],
            "replies": {"speech model": speech, "text-only cascade": cascade, "oracle": oracle}}
