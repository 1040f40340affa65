"""Stage-2 speech decoder with tiny random models: gate, AdaLN, causality, streaming, windows, fitting."""
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from emo_lib import decoder as D
from emo_lib import train as T

from tiny_models import tiny_decoder_config, tiny_speech_decoder  # tests/unit/tiny_models.py

H, E = 12, 6


def tiny_config(**overrides) -> D.Stage2Config:
    return tiny_decoder_config(H, E, **overrides)


def tiny_model(seed=0, scramble_adaln=True, **overrides) -> D.SpeechDecoder:
    """A random decoder; AdaLN weights are made non-zero so that emotion matters (they start at zero)."""
    return tiny_speech_decoder(H, E, seed=seed, scramble=scramble_adaln, **overrides)


def reply(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, generator=g), torch.randn(n, H, generator=g), torch.randn(n, E, generator=g)


def set_mean_duration(model, frames):
    """Bias the duration predictor towards ``frames`` frames per token (random variety remains)."""
    with torch.no_grad():
        model.duration_predictor.out.weight.mul_(0.2)
        model.duration_predictor.out.bias.fill_(math.log1p(frames))


# -- building blocks -------------------------------------------------------------------------------
def test_gate_output_is_an_elementwise_convex_combination():
    torch.manual_seed(0)
    gate = D.GatedFusion(8)
    with torch.no_grad():
        gate.proj.weight.normal_(0, 3.0)  # saturating gates too
    h, e = torch.randn(4, 5, 8), torch.randn(4, 5, 8) * 10
    x = gate(h, e)
    lo, hi = torch.minimum(h, e), torch.maximum(h, e)
    assert bool(((x >= lo - 1e-6) & (x <= hi + 1e-6)).all())
    g = gate.gate(h, e)
    assert torch.allclose(x, g * h + (1 - g) * e)
    share = float(((x - h).abs().mean() / (e - h).abs().mean()).detach())
    assert 0.05 < share < 0.95  # really a mix, not one side


def test_adaln_is_a_plain_layer_norm_at_initialisation_for_every_condition():
    torch.manual_seed(0)
    norm = D.AdaLN(16, E)
    x = torch.randn(3, 7, 16) * 5 + 2
    expected = F.layer_norm(x, (16,))
    for scale in (0.0, 1.0, 100.0):
        assert torch.allclose(norm(x, torch.randn(3, 7, E) * scale), expected, atol=1e-6)
    with torch.no_grad():
        norm.to_scale_shift.weight.normal_()
    assert not torch.allclose(norm(x, torch.randn(3, 7, E)), expected, atol=1e-3)  # learnable, not frozen


def test_a_fresh_model_ignores_emotion_until_adaln_learns():
    model = tiny_model(scramble_adaln=False)
    h, e, emo = reply(6)
    d = torch.full((6,), 3)
    a, b = model.generate(h, e, emo, durations=d), model.generate(h, e, emo * 5 + 1, durations=d)
    assert torch.equal(a["units"], b["units"])


def test_ablation_switches_remove_emotion_and_embeddings():
    h, e, emo = reply(7)
    mask, d = torch.ones(1, 7, dtype=torch.bool), torch.full((1, 7), 3)

    def logits(model, emotion, embeds):
        return model(h[None], embeds[None], emotion[None], mask, d)["unit_logits"]

    other_e = e + 2 * torch.randn(e.shape, generator=torch.Generator().manual_seed(1))  # not a constant shift: LN removes that
    full = tiny_model(seed=1)
    assert not torch.allclose(logits(full, emo, e), logits(full, emo + 3, e), atol=1e-4)
    assert not torch.allclose(logits(full, emo, e), logits(full, emo, other_e), atol=1e-4)
    no_adaln = tiny_model(seed=1, adaln=False)
    assert not any(isinstance(m, D.AdaLN) for m in no_adaln.modules())
    assert torch.allclose(logits(no_adaln, emo, e), logits(no_adaln, emo + 3, e))
    hidden_only = tiny_model(seed=1, fusion="hidden_only")
    assert hidden_only.fusion is None
    assert torch.allclose(logits(hidden_only, emo, e), logits(hidden_only, emo, other_e))


def test_emotion_strength_scales_the_plan_around_the_training_average_at_inference_only():
    model = tiny_speech_decoder(8, 4)
    rng = np.random.default_rng(0)
    model.set_emotion_stats(rng.normal(size=(50, 4)))
    emotion = torch.as_tensor(rng.normal(size=(6, 4)), dtype=torch.float32)
    plain = model.emotion_condition(emotion)
    model.emotion_strength = 2.0
    torch.testing.assert_close(model.emotion_condition(emotion), 2 * plain)
    model.emotion_strength = 0.0  # every plan becomes the average plan
    assert float(model.emotion_condition(emotion).abs().max()) == 0.0
    h, e = torch.randn(6, 8), torch.randn(6, 8)
    a = model.generate(h, e, emotion)
    b = model.generate(h, e, emotion + torch.randn(6, 4))
    assert all(torch.equal(a[k], b[k]) for k in ("units", "pitch", "energy", "durations"))
    model.emotion_strength = 3.0
    model.train()  # training always reads the plan as it is
    torch.testing.assert_close(model.emotion_condition(emotion), plain)
    assert not any("strength" in k for k in model.state_dict())  # a knob, not a weight


def test_pick_pitch_decides_voicing_before_the_f0_bin():
    # frame 0: P(unvoiced) 0.3, the voiced 0.7 spread over seven bins (0.1 each) -> argmax says unvoiced
    # frame 1: P(unvoiced) 0.6 -> unvoiced by both rules; frame 2: one clear voiced bin -> bin 5 by both
    probs = torch.zeros(3, 9)
    probs[0, 0], probs[0, 1:8] = 0.3, 0.1
    probs[0, 4] = 0.1001  # the likeliest voiced bin
    probs[1, 0], probs[1, 1:] = 0.6, 0.05
    probs[2, 5], probs[2, 0] = 0.9, 0.1
    logits = probs.clamp_min(1e-9).log()
    assert D.pick_pitch(logits, "argmax").tolist() == [0, 0, 5]
    assert D.pick_pitch(logits, "voicing_first").tolist() == [4, 0, 5]
    assert D.pick_pitch(torch.zeros(0, 9)).shape == (0,)
    with pytest.raises(ValueError, match="pitch_decoding"):
        D.pick_pitch(logits, "median")


def test_generate_and_stream_follow_the_pitch_rule():
    model = tiny_model(seed=4)
    set_mean_duration(model, 3)
    h, e, emo = reply(8, seed=3)
    assert model.pitch_decoding == "voicing_first"
    first = model.generate(h, e, emo)
    model.pitch_decoding = "argmax"
    plain = model.generate(h, e, emo)
    assert torch.equal(first["units"], plain["units"]) and torch.equal(first["energy"], plain["energy"])
    assert (first["pitch"] > 0).sum() >= (plain["pitch"] > 0).sum()  # voicing first never voices fewer frames
    voiced = plain["pitch"] > 0
    assert torch.equal(first["pitch"][voiced], plain["pitch"][voiced])  # a frame argmax voices keeps its bin
    model.pitch_decoding = "voicing_first"
    streamed = torch.cat([c["pitch"] for c in model.stream(zip(h, e, emo))])
    assert torch.equal(streamed, first["pitch"])


def test_config_round_trip_and_errors():
    config = tiny_config(fusion="hidden_only", adaln=False)
    assert D.Stage2Config.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="fusion"):
        tiny_config(fusion="concat")
    with pytest.raises(ValueError, match="unknown Stage2Config keys"):
        D.Stage2Config.from_dict({**config.to_dict(), "colour": 1})


# -- causality -------------------------------------------------------------------------------------
def test_future_tokens_and_frames_do_not_change_the_past():
    model = tiny_model(seed=2)
    n = 8
    h, e, emo = reply(n, seed=3)
    d = torch.tensor([[2, 3, 1, 4, 2, 3, 2, 2]])
    mask = torch.ones(1, n, dtype=torch.bool)
    base = model(h[None], e[None], emo[None], mask, d)
    k = 5  # change token k: tokens < k - lookahead, and their frames, must not move
    frames_before = int(d[0, : k - 1].sum())
    g = torch.Generator().manual_seed(9)

    def bump(x):
        x = x.clone()
        x[k] += 3 * torch.randn(x.shape[1], generator=g)
        return x

    for changed in (dict(h=bump(h)), dict(e=bump(e)), dict(emo=bump(emo))):
        hh, ee, mm = changed.get("h", h), changed.get("e", e), changed.get("emo", emo)
        out = model(hh[None], ee[None], mm[None], mask, d)
        assert torch.allclose(out["unit_logits"][:, :frames_before], base["unit_logits"][:, :frames_before], atol=1e-6)
        assert torch.allclose(out["log_durations"][:, : k - 1], base["log_durations"][:, : k - 1], atol=1e-6)
        assert not torch.allclose(out["unit_logits"], base["unit_logits"], atol=1e-4)  # the change did reach later frames
    # a longer last token adds frames at the end only
    longer = d.clone()
    longer[0, -1] = 6
    out = model(h[None], e[None], emo[None], mask, longer)
    kept = int(d[0, :-1].sum())
    assert torch.allclose(out["unit_logits"][:, :kept], base["unit_logits"][:, :kept], atol=1e-6)


def test_lookahead_is_exactly_one_token():
    model = tiny_model(seed=4)
    h, e, emo = reply(6, seed=5)
    mask, d = torch.ones(1, 6, dtype=torch.bool), torch.full((1, 6), 2)
    base = model(h[None], e[None], emo[None], mask, d)["log_durations"]
    h2 = h.clone()
    h2[3] += 3 * torch.randn(H, generator=torch.Generator().manual_seed(0))  # LN would undo a constant shift
    moved = model(h2[None], e[None], emo[None], mask, d)["log_durations"]
    assert torch.allclose(moved[0, :2], base[0, :2], atol=1e-6)
    assert not torch.isclose(moved[0, 2], base[0, 2], atol=1e-5)  # token 2 looks ahead at token 3


# -- generation and streaming ----------------------------------------------------------------------
@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_stream_equals_generate(lookahead):
    model = tiny_model(seed=6, lookahead_tokens=lookahead)
    set_mean_duration(model, 3)
    for n, seed in ((1, 0), (9, 1), (14, 2)):
        h, e, emo = reply(n, seed=seed)
        offline = model.generate(h, e, emo)
        chunks = list(model.stream(zip(h, e, emo.numpy())))  # numpy rows are accepted too
        assert [c["token"] for c in chunks] == list(range(n))
        assert [c["duration"] for c in chunks] == offline["durations"].tolist()
        for key in ("units", "pitch", "energy"):
            assert torch.equal(torch.cat([c[key] for c in chunks]), offline[key])
        assert len(offline["units"]) == int(offline["durations"].sum()) > 0


def test_stream_yields_a_token_as_soon_as_its_lookahead_arrives():
    model = tiny_model(seed=6, lookahead_tokens=1)
    h, e, emo = reply(5)
    fed = []

    def source():
        for i in range(5):
            fed.append(i)
            yield h[i], e[i], emo[i]

    for chunk in model.stream(source()):
        assert len(fed) == min(5, chunk["token"] + 2)


def test_long_replies_are_decoded_in_windows_without_losing_frames():
    model = tiny_model(seed=7, max_frames=16, max_token_frames=6)
    set_mean_duration(model, 4)
    h, e, emo = reply(30, seed=8)
    out = model.generate(h, e, emo)
    total = int(out["durations"].sum())
    assert total > 3 * 16 and len(out["windows"]) >= 3
    assert len(out["units"]) == len(out["pitch"]) == len(out["energy"]) == total
    emitted = []
    for start, first, end in out["windows"]:
        assert start <= first <= end
        assert int(out["durations"][start:end].sum()) <= 16  # every window fits the context
        emitted += list(range(first, end))
    assert emitted == list(range(30))  # each token emitted once, in order
    # the first window is exactly what an unwindowed decode of its tokens gives
    _, _, end = out["windows"][0]
    first_window = model.generate(h[:end + 1], e[:end + 1], emo[:end + 1], durations=out["durations"][:end + 1])
    n = int(out["durations"][:end].sum())
    assert torch.equal(out["units"][:n], first_window["units"][:n])
    streamed = list(model.stream(zip(h, e, emo)))
    assert torch.equal(torch.cat([c["units"] for c in streamed]), out["units"])
    with pytest.raises(D.DecoderInputError, match="longer than max_frames"):
        model(h[None], e[None], emo[None], torch.ones(1, 30, dtype=torch.bool), out["durations"][None])


def test_empty_reply_gives_empty_outputs():
    model = tiny_model()
    h, e, emo = reply(0)
    out = model.generate(h, e, emo)
    assert out["units"].shape == (0,) and out["durations"].shape == (0,)
    assert list(model.stream([])) == []
    with pytest.raises(D.DecoderInputError, match="no tokens"):
        D.stage2_batch([item(0, 0)])


def test_given_durations_and_width_errors():
    model = tiny_model()
    h, e, emo = reply(4)
    out = model.generate(h, e, emo, durations=np.array([1, 0, 2, 3]))
    assert out["durations"].tolist() == [1, 0, 2, 3] and len(out["units"]) == 6
    with pytest.raises(D.DecoderInputError, match=r"emotion must have shape \(N, 6\)"):
        model.generate(h, e, torch.zeros(4, 5))
    with pytest.raises(D.DecoderInputError, match="durations must have shape"):
        model.generate(h, e, emo, durations=[1, 2])


# -- durations, batches, loss ----------------------------------------------------------------------
def test_durations_from_spans_sum_to_the_unit_count():
    spans = [[0, 3], [3, 4], [4, 10], [10, 11]]
    d = D.durations_from_spans(spans, 6)
    assert d.sum() == 6 and (d >= 0).all()
    assert d.tolist() == [2, 0, 3, 1]  # boundaries 3, 4, 10 -> 2, 2, 5 (halves up), last -> 6
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 12, size=rng.integers(1, 20))
        ends = np.cumsum(lengths)
        spans = np.stack([ends - lengths, ends], 1)
        n_units = math.ceil(ends[-1] / 2)
        d = D.durations_from_spans(spans.tolist(), n_units)
        assert d.sum() == n_units and (d >= 0).all() and len(d) == len(lengths)
        assert np.all(np.abs(np.cumsum(d) - ends / 2) <= 1.0)  # each boundary lands on its 25 Hz place
    with pytest.raises(D.DecoderInputError, match="contiguous"):
        D.durations_from_spans([[0, 3], [4, 6]], 3)
    with pytest.raises(D.DecoderInputError, match="n_units = 40"):
        D.durations_from_spans([[0, 3], [3, 6]], 40)


def item(seed, n, units_fn=None, n_units=10, frames_per_token=None, with_pred=True):
    rng = np.random.default_rng(seed)
    d = rng.integers(1, 5, size=n) if frames_per_token is None else np.full(n, frames_per_token)
    f = int(d.sum())
    units = rng.integers(0, n_units, size=f) if units_fn is None else units_fn(d)
    return {"pair_id": f"p{seed}", "hidden": rng.normal(size=(n, H)).astype(np.float32),
            "embeds": rng.normal(size=(n, H)).astype(np.float32), "emotion_gt": rng.normal(size=(n, E)).astype(np.float32),
            "emotion_pred": rng.normal(size=(n, E)).astype(np.float32) if with_pred else None, "durations": d,
            "units": units, "pitch": rng.integers(0, 5, size=f), "energy": rng.integers(0, 3, size=f)}


def test_stage2_batch_pads_and_checks_frames():
    items = [item(0, 3), item(1, 6)]
    batch = D.stage2_batch(items)
    assert batch["hidden"].shape == (2, 6, H) and batch["token_mask"].sum().item() == 9
    assert batch["frame_mask"].sum(1).tolist() == [int(items[0]["durations"].sum()), int(items[1]["durations"].sum())]
    bad = item(2, 4)
    bad["units"] = bad["units"][:-1]
    with pytest.raises(D.DecoderInputError, match="p2: .* units frames, but the durations add up to"):
        D.stage2_batch([bad])


def test_loss_terms_and_out_of_vocabulary_units():
    model = tiny_model()
    batch = D.mix_emotion(D.stage2_batch([item(0, 5), item(1, 3)]), 0.5)
    terms = model.loss(batch)
    for key in ("loss", "unit_ce", "pitch_ce", "energy_ce", "duration_mse", "unit_accuracy"):
        assert terms[key].dim() == 0 and torch.isfinite(terms[key])
    expected = terms["unit_ce"] + terms["pitch_ce"] + terms["energy_ce"] + terms["duration_mse"]
    assert torch.allclose(terms["loss"], expected)
    bad = item(2, 4)
    bad["units"][3] = 10  # vocabulary is [0, 10)
    with pytest.raises(D.DecoderInputError, match="units id 10 is outside the vocabulary"):
        model.loss(D.mix_emotion(D.stage2_batch([bad]), 0.0))
    with pytest.raises(D.DecoderInputError, match="no emotion_pred"):
        D.mix_emotion(D.stage2_batch([item(3, 2, with_pred=False)]), 0.3)


def test_emotion_schedules():
    linear = {"kind": "linear", "start_fraction": 0.25, "end_fraction": 0.75, "end_alpha": 0.8}
    assert D.emotion_mix(0, 100, linear) == 0.0
    assert D.emotion_mix(25, 100, linear) == 0.0
    assert D.emotion_mix(50, 100, linear) == pytest.approx(0.4)
    assert D.emotion_mix(75, 100, linear) == pytest.approx(0.8)
    assert D.emotion_mix(99, 100, linear) == pytest.approx(0.8)
    curve = D.schedule_curve(100, linear)
    assert curve.shape == (100,) and np.all(np.diff(curve) >= 0)
    assert np.all(D.schedule_curve(10, {"kind": "fixed", "alpha": 0.7}) == 0.7)
    with pytest.raises(ValueError, match="kind must be"):
        D.emotion_mix(0, 10, {"kind": "cosine"})
    with pytest.raises(ValueError, match="unknown keys"):
        D.emotion_mix(0, 10, {"kind": "fixed", "end_alpha": 1.0})
    gt, pred = torch.zeros(1, 2, E), torch.ones(1, 2, E)
    mixed = D.mix_emotion({"emotion_gt": gt, "emotion_pred": pred}, 0.7)["emotion"]
    assert torch.allclose(mixed, torch.full_like(gt, 0.7))


# -- training --------------------------------------------------------------------------------------
def _tiny_fit(tmp_path, cfg_extra: dict):
    """Fit the tiny dataset of the test below with ``train_loop``; returns (model, items, history)."""
    vocab = np.random.default_rng(0).normal(size=(6, H)).astype(np.float32)
    items = []
    for s in range(8):
        rng = np.random.default_rng(100 + s)
        ids = rng.integers(0, 6, size=6)
        it = item(s, 6, frames_per_token=3)
        it["embeds"] = vocab[ids]
        it["hidden"] = vocab[ids] + 0.1 * rng.normal(size=(6, H)).astype(np.float32)
        it["units"] = np.array([(i * 3 + k) % 10 for i in ids for k in range(3)])
        it["pitch"] = np.array([i % 5 for i in ids for _ in range(3)])
        items.append(it)
    torch.manual_seed(0)
    model = D.SpeechDecoder(tiny_config(dim=32, heads=2, layers=2))
    model.set_emotion_stats(np.concatenate([it["emotion_gt"] for it in items]))
    steps = 100
    loss_fn = D.make_loss_fn(steps, {"kind": "linear", "start_fraction": 0.2, "end_fraction": 0.6, "end_alpha": 1.0})
    cfg = {"steps": steps, "batch_size": 4, "lr": {"decoder": 3e-3}, "weight_decay": {"decoder": 0.0},
           "warmup_steps": 5, "eval_every": 1000, "checkpoint_every": 1000, "bf16": False, **cfg_extra}
    history = T.train_loop(model, model.parameter_groups(), items, loss_fn, cfg, checkpoint_dir=tmp_path / "ck",
                           payload_fn=D.checkpoint_payload, progress=False)
    return model, items, history


def test_a_tiny_dataset_is_fitted_with_train_loop(tmp_path):
    """Units are a function of the token's identity and the frame's place in it: learnable in 100 steps."""
    model, items, history = _tiny_fit(tmp_path, {})
    assert history["alpha"][0] == 0.0 and history["alpha"][-1] == 1.0  # train_loop passed the step
    metrics = D.evaluate_stage2(model, items, alpha=1.0)
    assert metrics["unit_accuracy"] > 0.9, metrics
    assert metrics["duration_mae_frames"] < 1.0, metrics
    assert history["loss"][-1] < 0.3 * history["loss"][0]
    # the checkpoint train_loop wrote loads back into an identical decoder
    loaded = D.load_decoder(tmp_path / "ck" / "latest.pt")
    h, e, emo = (torch.as_tensor(items[0][k]) for k in ("hidden", "embeds", "emotion_pred"))
    assert torch.equal(loaded.generate(h, e, emo)["units"], model.eval().generate(h, e, emo)["units"])


def test_cpu_bfloat16_autocast_is_used_only_where_native_and_still_learns(tmp_path, monkeypatch, autocast_calls):
    """``cpu_bf16`` asks for bfloat16 autocast on a CPU; it is used only where the CPU computes it natively."""
    import emo_lib.token2wav as T2W

    monkeypatch.setattr(T2W, "native_bfloat16", lambda device="cpu": False)
    assert T.autocast_settings({"bf16": True, "cpu_bf16": True}, "cpu") == (False, "cpu")  # emulated: float32
    monkeypatch.setattr(T2W, "native_bfloat16", lambda device="cpu": True)
    assert T.autocast_settings({"bf16": True, "cpu_bf16": True}, "cpu") == (True, "cpu")
    assert T.autocast_settings({"bf16": True, "cpu_bf16": False}, "cpu") == (False, "cpu")
    assert T.autocast_settings({"bf16": False, "cpu_bf16": True}, "cuda:0") == (False, "cuda")
    # the name notebooks 05/06 and the arm caches record
    assert T.train_precision({"cpu_bf16": True}, "cpu") == "bfloat16"
    assert T.train_precision({"cpu_bf16": False}, "cpu") == "float32"
    assert T.train_precision(None, "cpu") == "float32"
    assert T.train_precision({"bf16": True}, "cuda") == "bfloat16"
    seen = autocast_calls
    model, items, history = _tiny_fit(tmp_path, {"cpu_bf16": True})
    assert seen and all(s == ("cpu", torch.bfloat16, True) for s in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and optimizer stay float32
    metrics = D.evaluate_stage2(model, items, alpha=1.0)
    assert metrics["unit_accuracy"] > 0.9, metrics  # the same bound as in float32
    assert history["loss"][-1] < 0.3 * history["loss"][0]


def test_save_load_round_trip_and_refusals(tmp_path):
    model = tiny_model(seed=9)
    with torch.no_grad():
        model.emotion_mean.fill_(0.5)
    path = D.save_decoder(tmp_path / "decoder.pt", model, extra={"note": "x"})
    loaded = D.load_decoder(path)
    assert loaded.config == model.config and torch.equal(loaded.emotion_mean, model.emotion_mean)
    h, e, emo = reply(5)
    for key in ("units", "pitch", "energy", "durations"):
        assert torch.equal(loaded.generate(h, e, emo)[key], model.generate(h, e, emo)[key])
    other = D.checkpoint_payload(model)
    with pytest.raises(T.CheckpointError, match="max_frames"):
        D.check_checkpoint(other, tiny_config(max_frames=32), path)
    T.save_checkpoint(tmp_path / "stage1.pt", {"kind": "stage1"})
    with pytest.raises(T.CheckpointError, match="not a stage-2 checkpoint"):
        D.load_decoder(tmp_path / "stage1.pt")
    from emo_lib.paths import MissingInputError

    with pytest.raises(MissingInputError, match="06_stage2.ipynb"):
        D.load_decoder(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="does not fit"):
        D.SpeechDecoder(tiny_config(dim=32)).load_trainable_state(model.trainable_state())


def test_stream_equals_generate_with_silent_tokens_and_many_windows():
    """Tokens of 0 frames (a DTW span shorter than one unit) and window switches in the same reply."""
    model = tiny_model(seed=3, max_frames=12, max_token_frames=6)
    with torch.no_grad():
        model.duration_predictor.out.weight.mul_(3)
        model.duration_predictor.out.bias.fill_(0.6)
    h, e, emo = reply(40, seed=3)
    offline = model.generate(h, e, emo)
    assert (offline["durations"] == 0).sum() > 5 and len(offline["windows"]) > 5
    chunks = list(model.stream(zip(h, e, emo)))
    for key in ("units", "pitch", "energy"):
        assert torch.equal(torch.cat([c[key] for c in chunks]), offline[key])


# -- presets, the registry, old checkpoints --------------------------------------------------------
def test_schedule_from_preset_linear_and_fixed():
    s2 = {"schedule": "linear", "schedule_start": 0.1, "schedule_end": 0.5, "schedule_alpha": 0.9,
          "schedule_fixed_share": 0.3}
    linear = D.schedule_from_preset(s2)
    assert linear == {"kind": "linear", "start_fraction": 0.1, "end_fraction": 0.5, "end_alpha": 0.9}
    assert D.emotion_mix(50, 100, linear) == pytest.approx(0.9)
    fixed = D.schedule_from_preset({**s2, "schedule": "fixed"})
    assert fixed == {"kind": "fixed", "alpha": 0.3}
    assert D.schedule_from_preset({"schedule": "fixed"}) == {"kind": "fixed", "alpha": 0.7}  # the public code's mix
    loss_fn = D.make_loss_fn(10, fixed)  # the schedule make_loss_fn accepts (notebook 06's old dict did not)
    assert float(loss_fn(tiny_model(), [item(0, 3), item(1, 2)], 0)["alpha"]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="stage2.schedule must be"):
        D.schedule_from_preset({"schedule": "cosine"})
    with pytest.raises(ValueError, match="alpha must be in"):
        D.schedule_from_preset({"schedule": "fixed", "schedule_fixed_share": 1.5})
    with pytest.raises(ValueError, match=r"needs stage2 keys \['schedule_alpha'\]"):
        D.schedule_from_preset({"schedule": "linear", "schedule_start": 0.1, "schedule_end": 0.5})


def test_config_from_preset_and_first_unit():
    cfg = {"stage2": {"dim": 32, "layers": 3, "heads": 4, "max_frames": 100, "lookahead_tokens": 2,
                      "fusion": "none", "adaln": True, "speaker": False, "steps": 5}}
    config = D.config_from_preset(cfg, H, E, {"n_units": 20, "pitch_bins": 7, "energy_bins": 4})
    assert (config.dim, config.layers, config.heads, config.max_frames, config.lookahead_tokens) == (32, 3, 4, 100, 2)
    assert config.speaker_dim == 0
    with_voice = D.config_from_preset({"stage2": {**cfg["stage2"], "speaker": True}}, H, E,
                                      {"n_units": 20, "pitch_bins": 7, "energy_bins": 4})
    assert with_voice.speaker_dim == D.SPEAKER_DIM == 160
    sizes = (config.n_units, config.pitch_bins, config.energy_bins, config.hidden_dim, config.emotion_dim)
    assert sizes == (20, 7, 4, H, E)
    assert config.fusion == "none" and config.adaln and not config.use_adaln
    assert D.SpeechDecoder(config).first_unit_after_tokens == 3
    assert tiny_model(lookahead_tokens=0).first_unit_after_tokens == 1


def test_checkpoints_record_the_decoder_and_old_ones_load_as_durations(tmp_path):
    model = tiny_model(seed=4)
    payload = D.checkpoint_payload(model)
    assert payload["decoder"] == "durations" == model.registry_name
    D.check_checkpoint(payload, model.config, "x.pt")
    old = {k: v for k, v in payload.items() if k != "decoder"}  # written before the registry existed
    D.check_checkpoint(old, model.config, "old.pt")
    T.save_checkpoint(tmp_path / "old.pt", old)
    loaded = D.load_decoder(tmp_path / "old.pt")
    assert type(loaded) is D.SpeechDecoder and loaded.config == model.config
    h, e, emo = reply(5)
    assert torch.equal(loaded.generate(h, e, emo)["units"], model.generate(h, e, emo)["units"])
    T.save_checkpoint(tmp_path / "odd.pt", {**payload, "decoder": "ctc"})
    with pytest.raises(T.CheckpointError, match="unknown stage-2 decoder 'ctc'"):
        D.load_decoder(tmp_path / "odd.pt")


# -- the voice input -------------------------------------------------------------------------------
S = 7  # a tiny speaker-reference width


def test_the_voice_input_changes_the_plan_and_is_required_once_configured():
    model = tiny_model(seed=3, speaker_dim=S)
    h, e, emo = reply(5)
    a, b = torch.randn(S), torch.randn(S) * 3
    with pytest.raises(D.DecoderInputError, match="pass speaker="):
        model.generate(h, e, emo)
    with pytest.raises(D.DecoderInputError, match="speaker must have shape"):
        model.generate(h, e, emo, speaker=torch.randn(S + 1))
    d = np.array([2, 1, 3, 2, 1])
    one, two = model.generate(h, e, emo, durations=d, speaker=a), model.generate(h, e, emo, durations=d, speaker=b)
    x = model.token_vectors(h[None], e[None], torch.ones(1, 5, dtype=torch.bool), a)
    y = model.token_vectors(h[None], e[None], torch.ones(1, 5, dtype=torch.bool), b)
    assert not torch.allclose(x, y)  # every token vector hears the voice
    assert any(not torch.equal(one[k], two[k]) for k in ("units", "pitch", "energy"))
    # streaming with a voice equals generate with that voice
    offline = model.generate(h, e, emo, speaker=a)
    chunks = list(model.stream(zip(h, e, emo), speaker=a))
    for key in ("units", "pitch", "energy"):
        assert torch.equal(torch.cat([c[key] for c in chunks]), offline[key])
    # a decoder without a voice input ignores one
    plain = tiny_model(seed=3)
    assert torch.equal(plain.generate(h, e, emo, speaker=a)["units"], plain.generate(h, e, emo)["units"])


def test_stage2_batch_stacks_voices_only_when_every_item_has_one():
    items = [item(0, 3), item(1, 4)]
    assert D.stage2_batch(items)["speaker"] is None
    voiced = [{**it, "speaker": np.full(S, k, dtype=np.float32)} for k, it in enumerate(items)]
    batch = D.stage2_batch(voiced)
    assert batch["speaker"].shape == (2, S) and batch["speaker"][1, 0] == 1.0
    assert D.stage2_batch([voiced[0], items[1]])["speaker"] is None


def test_with_the_voice_the_decoder_learns_pitch_that_depends_on_the_speaker(tmp_path):
    """Two voices an octave apart say the same tokens: pitch = the token's melody + the voice's register.

    Without the voice the pitch of a frame is a coin flip between the registers (accuracy about 0.5);
    with it, the decoder learns both (the kit's reason for ``stage2.speaker``).
    """
    vocab = np.random.default_rng(0).normal(size=(6, H)).astype(np.float32)
    voices = np.random.default_rng(1).normal(size=(2, S)).astype(np.float32)

    def dataset():
        items = []
        for s in range(16):  # 8 token sequences, each said by both voices with the same emotion plan
            rng = np.random.default_rng(200 + s // 2)
            ids, who = rng.integers(0, 6, size=6), s % 2
            it = item(s // 2, 6, frames_per_token=2)
            it["embeds"] = it["hidden"] = vocab[ids]
            it["units"] = np.array([i for i in ids for _ in range(2)])
            it["pitch"] = np.array([(i % 2) + 3 * who for i in ids for _ in range(2)])  # registers {0,1} and {3,4}
            it["speaker"] = voices[who]
            items.append(it)
        return items

    def fit(speaker_dim):
        items = dataset()
        torch.manual_seed(0)
        model = D.SpeechDecoder(tiny_config(dim=32, heads=2, layers=2, speaker_dim=speaker_dim))
        model.set_emotion_stats(np.concatenate([it["emotion_gt"] for it in items]))
        cfg = {"steps": 120, "batch_size": 8, "lr": {"decoder": 3e-3}, "weight_decay": {"decoder": 0.0},
               "warmup_steps": 5, "eval_every": 1000, "checkpoint_every": 1000, "bf16": False}
        T.train_loop(model, model.parameter_groups(), items, D.make_loss_fn(120), cfg,
                     checkpoint_dir=tmp_path / f"ck{speaker_dim}", payload_fn=D.checkpoint_payload, progress=False)
        return D.evaluate_stage2(model.eval(), items, alpha=1.0)["pitch_accuracy"], model

    with_voice, model = fit(S)
    without, _ = fit(0)
    assert with_voice > 0.9, with_voice
    assert without < 0.75, without
    # the checkpoint keeps the voice input
    loaded = D.load_decoder(tmp_path / f"ck{S}" / "latest.pt")
    assert loaded.config.speaker_dim == S
    h, e, emo = (torch.as_tensor(dataset()[0][k]) for k in ("hidden", "embeds", "emotion_pred"))
    assert torch.equal(loaded.generate(h, e, emo, speaker=voices[0])["pitch"],
                       model.generate(h, e, emo, speaker=voices[0])["pitch"])
