"""The interleaved (read R / write W) stage-2 decoder with tiny random models; the decoder registry."""
import math

import numpy as np
import pytest
import torch

from emo_lib import decoder as D
from emo_lib import interleaved as I
from emo_lib import train as T

from tiny_models import scramble_adaln, tiny_speech_decoder  # tests/unit/tiny_models.py

H, E = 12, 6


def tiny_config(**overrides) -> I.InterleavedConfig:
    values = dict(hidden_dim=H, emotion_dim=E, dim=16, layers=2, heads=2, n_units=10, pitch_bins=5, energy_bins=3,
                  max_frames=48, read_tokens=2, write_units=3, dropout=0.0)
    values.update(overrides)
    return I.InterleavedConfig(**values)


def tiny_model(seed=0, scramble=True, **overrides) -> I.InterleavedDecoder:
    """A random decoder; AdaLN weights non-zero (so emotion matters) and sharper heads (varied argmaxes)."""
    torch.manual_seed(seed)
    model = I.InterleavedDecoder(tiny_config(**overrides))
    if scramble:
        scramble_adaln(model)
        with torch.no_grad():
            for head in (model.unit_head, model.pitch_head, model.energy_head):
                head.weight.mul_(3)
    return model.eval()


def durations_model(seed=0, **overrides) -> D.SpeechDecoder:
    """A random ``SpeechDecoder`` of the same sizes (AdaLN weights non-zero), for side-by-side checks."""
    return tiny_speech_decoder(H, E, seed=seed, **overrides)


def reply(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, generator=g), torch.randn(n, H, generator=g), torch.randn(n, E, generator=g)


def item(seed, n, f, n_units=10):
    """A training item as ``decoder.load_stage2_items`` makes it (durations: any split of the f frames)."""
    rng = np.random.default_rng(seed)
    durations = np.full(n, f // n)
    durations[-1] += f - durations.sum()
    return {"pair_id": f"p{seed}", "hidden": rng.normal(size=(n, H)).astype(np.float32),
            "embeds": rng.normal(size=(n, H)).astype(np.float32),
            "emotion_gt": rng.normal(size=(n, E)).astype(np.float32),
            "emotion_pred": rng.normal(size=(n, E)).astype(np.float32), "durations": durations,
            "units": rng.integers(0, n_units, size=f), "pitch": rng.integers(0, 5, size=f),
            "energy": rng.integers(0, 3, size=f)}


def teacher_forced(model, h, e, emo, units, pitch, energy):
    """Logits per target of one reply with the given speech tokens as the writer's inputs."""
    f = len(units)
    return model(h[None], e[None], emo[None], torch.ones(1, len(h), dtype=torch.bool), torch.as_tensor(units)[None],
                 torch.as_tensor(pitch)[None], torch.as_tensor(energy)[None], torch.ones(1, f, dtype=torch.bool))


# -- layout ----------------------------------------------------------------------------------------
def test_layout_of_the_docstring_diagram():
    lay = I.interleave_layout(5, 9, read_tokens=2, write_units=3)
    r, w = I.READ, I.WRITE
    assert lay["kind"].tolist() == [r, r, w, w, w, r, r, w, w, w, r, w, w, w, w]
    assert lay["token"].tolist() == [0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4]  # the read, or the latest read
    assert lay["frame"].tolist() == [-1, -1, 0, 1, 2, -1, -1, 3, 4, 5, -1, 6, 7, 8, 9]  # 9 = EOS, at the very end
    assert lay["write_positions"].tolist() == [2, 3, 4, 7, 8, 9, 11, 12, 13, 14]


def test_layout_defaults_and_the_tail_after_the_text():
    lay = I.interleave_layout(8, 30, read_tokens=4, write_units=8)
    reads = np.flatnonzero(lay["kind"] == I.READ).tolist()
    assert reads == [0, 1, 2, 3, 12, 13, 14, 15]  # read 4, write 8, read 4, then only writes
    assert lay["write_positions"][0] == 4 and lay["write_positions"][8] == 16
    assert len(lay["kind"]) == 8 + 31 and lay["frame"][-1] == 30  # EOS last
    assert (lay["token"][16:] == 7).all()  # the tail is conditioned on the last token


def test_layout_invariants_and_early_eos():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, f = int(rng.integers(1, 15)), int(rng.integers(0, 40))
        r, w = int(rng.integers(1, 5)), int(rng.integers(1, 9))
        lay = I.interleave_layout(n, f, r, w)
        kind, token, frame, pos = lay["kind"], lay["token"], lay["frame"], lay["write_positions"]
        assert (frame[pos] == np.arange(f + 1)).all() and (kind[pos] == I.WRITE).all()
        read_tokens = token[kind == I.READ]
        assert (read_tokens == np.arange(len(read_tokens))).all()  # every kept token once, in order
        for p in pos:  # a write is conditioned on the latest read before it, after ceil-blocks of reads
            assert token[p] == read_tokens[np.flatnonzero(np.flatnonzero(kind == I.READ) < p)[-1]]
            j = frame[p]
            assert token[p] + 1 == min(n, (min(j // w, math.ceil(n / r) - 1) + 1) * r)
        if len(read_tokens) < n:  # tokens are dropped only when EOS comes before their block
            assert kind[-1] == I.WRITE and frame[-1] == f and (len(read_tokens) // r) * w > f
    lay = I.interleave_layout(10, 2, read_tokens=2, write_units=3)  # speech ends in the first write block
    assert lay["kind"].tolist() == [I.READ, I.READ, I.WRITE, I.WRITE, I.WRITE]
    lay = I.interleave_layout(10, 3, read_tokens=2, write_units=3)  # EOS right after the second read block
    assert lay["kind"].tolist() == [0, 0, 1, 1, 1, 0, 0, 1] and lay["frame"][-1] == 3
    with pytest.raises(D.DecoderInputError, match="at least one text token"):
        I.interleave_layout(0, 5, 2, 3)


# -- causality -------------------------------------------------------------------------------------
def test_future_reads_and_units_do_not_change_earlier_logits():
    model = tiny_model(seed=1)
    n, f = 7, 20
    h, e, emo = reply(n, seed=2)
    g = torch.Generator().manual_seed(3)
    units, pitch, energy = (torch.randint(0, k, (f,), generator=g) for k in (10, 5, 3))
    base = teacher_forced(model, h, e, emo, units, pitch, energy)
    r, w = 2, 3
    k = 4  # token 4 is read in block 2, after targets 0 .. 5
    before = (k // r) * w

    def bump(x):
        x = x.clone()
        x[k] += 3 * torch.randn(x.shape[1], generator=g)
        return x

    for hh, ee, mm in ((bump(h), e, emo), (h, bump(e), emo), (h, e, bump(emo))):
        out = teacher_forced(model, hh, ee, mm, units, pitch, energy)
        for key in ("unit_logits", "pitch_logits", "energy_logits"):
            assert torch.allclose(out[key][:, :before], base[key][:, :before], atol=1e-6)
        assert not torch.allclose(out["unit_logits"][:, before:], base["unit_logits"][:, before:], atol=1e-4)
    j0 = 9  # unit 9 is the input of target 10: targets <= 9 must not move
    changed = units.clone()
    changed[j0] = (changed[j0] + 1) % 10
    out = teacher_forced(model, h, e, emo, changed, pitch, energy)
    assert torch.allclose(out["unit_logits"][:, : j0 + 1], base["unit_logits"][:, : j0 + 1], atol=1e-6)
    assert not torch.allclose(out["unit_logits"][:, j0 + 1], base["unit_logits"][:, j0 + 1], atol=1e-4)


# -- generation ------------------------------------------------------------------------------------
def test_generate_with_cache_equals_without_and_the_teacher_forced_choice():
    for seed, n, eos_bias in ((4, 5, 0.0), (5, 9, -50.0), (6, 1, 0.0)):
        model = tiny_model(seed=seed)
        with torch.no_grad():
            model.unit_head.bias[-1] += eos_bias  # -50: never stop, run into max_frames
        h, e, emo = reply(n, seed=seed)
        cached, plain = model.generate(h, e, emo), model.generate(h, e, emo, use_cache=False)
        for key in ("units", "pitch", "energy"):
            assert torch.equal(cached[key], plain[key])
        assert cached["eos"] == plain["eos"] and cached["durations"].shape == (0,)
        f = len(cached["units"])
        if eos_bias < 0:
            assert f == model.config.max_frames and not cached["eos"]
        if f == 0:
            continue
        out = teacher_forced(model, h, e, emo, cached["units"], cached["pitch"], cached["energy"])
        assert torch.equal(out["unit_logits"][0, :f].argmax(-1), cached["units"])
        assert torch.equal(D.pick_pitch(out["pitch_logits"][0, :f], model.pitch_decoding), cached["pitch"])
        assert torch.equal(out["energy_logits"][0, :f].argmax(-1), cached["energy"])
        if cached["eos"]:
            assert int(out["unit_logits"][0, f].argmax()) == model.config.eos


def test_stream_equals_generate_and_writes_after_every_read_block():
    model = tiny_model(seed=7)
    with torch.no_grad():
        model.unit_head.bias[-1] -= 50.0
    h, e, emo = reply(7, seed=7)
    fed = []

    def source():
        for i in range(7):
            fed.append(i)
            yield h[i], e[i], emo[i].numpy()  # numpy rows are accepted too

    chunks = []
    for chunk in model.stream(source()):
        chunks.append((len(fed), chunk))
    assert model.first_unit_after_tokens == 2
    assert [fed_at for fed_at, _ in chunks[:3]] == [2, 4, 6]  # a block as soon as R tokens are in
    assert [c["tokens_read"] for _, c in chunks[:4]] == [2, 4, 6, 7]
    assert all(len(c["units"]) == 3 for _, c in chunks)  # W per block, 48 = 16 blocks
    offline = model.generate(h, e, emo)
    for key in ("units", "pitch", "energy"):
        assert torch.equal(torch.cat([c[key] for _, c in chunks]), offline[key])


def test_early_eos_and_empty_reply():
    model = tiny_model(seed=8)
    with torch.no_grad():
        model.unit_head.bias[-1] += 100.0  # EOS at once
    h, e, emo = reply(9)
    out = model.generate(h, e, emo)
    assert out["units"].shape == (0,) and out["eos"] and out["tokens_read"] == 2  # the rest is never read
    assert len(list(model.stream(zip(h, e, emo)))) == 1
    empty = model.generate(*reply(0))
    assert empty["units"].shape == (0,) and not empty["eos"]
    with pytest.raises(D.DecoderInputError, match=r"emotion must have shape \(N, 6\)"):
        model.generate(h, e, torch.zeros(9, 5))


@pytest.mark.parametrize("kind", ["durations", "interleaved"])
def test_fusion_none_ignores_emotion_and_embeddings(kind):
    h, e, emo = reply(6, seed=3)
    other_emo, other_e = emo * 4 + 2, e + 2 * torch.randn(e.shape, generator=torch.Generator().manual_seed(1))

    def make(**overrides):
        if kind == "interleaved":
            model = tiny_model(seed=2, **overrides)
            with torch.no_grad():
                model.unit_head.bias[-1] -= 50.0
            return model
        return durations_model(seed=2, **overrides)

    def outputs(model, emotion, embeds):
        if kind == "interleaved":
            return model.generate(h, embeds, emotion)["units"], \
                teacher_forced(model, h, embeds, emotion, torch.arange(12) % 10, torch.zeros(12, dtype=torch.long),
                               torch.zeros(12, dtype=torch.long))["unit_logits"]
        d = torch.full((6,), 3)
        return model.generate(h, embeds, emotion, durations=d)["units"], \
            model(h[None], embeds[None], emotion[None], torch.ones(1, 6, dtype=torch.bool), d[None])["unit_logits"]

    full = make(fusion="gate")
    assert not torch.allclose(outputs(full, emo, e)[1], outputs(full, other_emo, e)[1], atol=1e-4)
    assert not torch.allclose(outputs(full, emo, e)[1], outputs(full, emo, other_e)[1], atol=1e-4)
    none = make(fusion="none", adaln=True)  # "none" wins over adaln=True
    assert not any(isinstance(m, D.AdaLN) for m in none.modules()) and none.fusion is None
    base = outputs(none, emo, e)
    for changed in (outputs(none, other_emo, e), outputs(none, emo, other_e)):
        assert torch.equal(changed[0], base[0])
        assert torch.allclose(changed[1], base[1])
    hidden_only = make(fusion="hidden_only")  # keeps AdaLN: emotion still matters
    assert any(isinstance(m, D.AdaLN) for m in hidden_only.modules())
    assert not torch.allclose(outputs(hidden_only, emo, e)[1], outputs(hidden_only, other_emo, e)[1], atol=1e-4)


# -- training --------------------------------------------------------------------------------------
def test_two_items_are_overfitted_and_generated_back_with_eos():
    items = [item(0, 5, 16), item(1, 4, 13)]
    torch.manual_seed(0)
    model = I.InterleavedDecoder(tiny_config(dim=32, read_tokens=2, write_units=3))
    model.set_emotion_stats(np.concatenate([it["emotion_gt"] for it in items]))
    optimizer = torch.optim.AdamW(model.parameter_groups()["decoder"], lr=3e-3, weight_decay=0.0)
    loss_fn = D.make_loss_fn(60, D.schedule_from_preset({"schedule": "fixed", "schedule_fixed_share": 0.0}))
    model.train()
    losses = []
    for step in range(60):
        terms = loss_fn(model, items, step)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(float(terms["loss"].detach()))
    model.eval()
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    for it in items:
        out = model.generate(it["hidden"], it["embeds"], it["emotion_gt"])
        f = len(it["units"])
        assert out["eos"] and len(out["units"]) == f, out
        assert (out["units"].numpy() == it["units"]).mean() >= 0.9
        assert (out["pitch"].numpy() == it["pitch"]).mean() >= 0.9
    metrics = D.evaluate_stage2(model, items, alpha=0.0)
    assert metrics["unit_accuracy"] > 0.9 and math.isnan(metrics["duration_mae_frames"])


def test_loss_has_the_durations_decoders_terms_and_checks_inputs():
    batch = D.mix_emotion(D.stage2_batch([item(0, 5, 16), item(1, 3, 7)]), 0.5)
    terms, reference = tiny_model().loss(batch), durations_model().loss(batch)
    assert set(terms) == set(reference)
    for key, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value)
    assert float(terms["duration_mse"]) == 0.0
    assert torch.allclose(terms["loss"], terms["unit_ce"] + terms["pitch_ce"] + terms["energy_ce"])
    # padding does not leak: a short row's logits are the same alone and batched with a longer row
    out = tiny_model()(batch["hidden"], batch["embeds"], batch["emotion"], batch["token_mask"], batch["units"],
                       batch["pitch"], batch["energy"], batch["frame_mask"])
    assert out["target_mask"].sum(1).tolist() == [17, 8]
    single = D.stage2_batch([item(1, 3, 7)])
    row = tiny_model()(single["hidden"], single["embeds"], single["emotion_gt"] * 0.5 + single["emotion_pred"] * 0.5,
                       single["token_mask"], single["units"], single["pitch"], single["energy"], single["frame_mask"])
    assert torch.allclose(out["unit_logits"][1, :8], row["unit_logits"][0], atol=1e-5)
    bad = item(2, 4, 9)
    bad["units"][3] = 10
    with pytest.raises(D.DecoderInputError, match="units id 10 is outside the vocabulary"):
        tiny_model().loss(D.mix_emotion(D.stage2_batch([bad]), 0.0))
    with pytest.raises(D.DecoderInputError, match="longer than max_frames"):
        tiny_model(max_frames=8).loss(D.mix_emotion(D.stage2_batch([item(3, 3, 9)]), 0.0))


# -- registry, presets, checkpoints ----------------------------------------------------------------
PRESET = {"stage2": {"dim": 16, "layers": 2, "heads": 2, "max_frames": 64, "lookahead_tokens": 2, "fusion": "gate",
                     "adaln": True, "speaker": True, "read_tokens": 3, "write_units": 5}}
META = {"n_units": 10, "pitch_bins": 5, "energy_bins": 3, "unit_hz": 25}


def test_build_decoder_by_name():
    assert {"durations", "interleaved"} <= set(D.decoder_names()) and D.DECODERS["interleaved"] is I.InterleavedDecoder
    durations = D.build_decoder("durations", PRESET, H, E, META)
    assert type(durations) is D.SpeechDecoder and durations.config.lookahead_tokens == 2
    assert durations.config.n_units == 10 and durations.config.hidden_dim == H
    assert durations.first_unit_after_tokens == 3
    assert durations.config.speaker_dim == D.SPEAKER_DIM  # stage2.speaker: the voice input
    interleaved = D.build_decoder("interleaved", PRESET, H, E, META)
    assert type(interleaved) is I.InterleavedDecoder and interleaved.registry_name == "interleaved"
    c = interleaved.config
    assert (c.read_tokens, c.write_units, c.dim, c.max_frames, c.pitch_bins) == (3, 5, 16, 64, 5)
    assert interleaved.first_unit_after_tokens == 3
    assert interleaved.unit_head.out_features == 11  # units + EOS
    defaults = {"stage2": {k: v for k, v in PRESET["stage2"].items() if k not in ("read_tokens", "write_units")}}
    assert D.build_decoder("interleaved", defaults, H, E, META).config.read_tokens == 4
    with pytest.raises(ValueError, match=r"unknown stage-2 decoder 'ctc'.*\['durations', 'interleaved'"):
        D.build_decoder("ctc", PRESET, H, E, META)
    with pytest.raises(ValueError, match=r"lacks \['heads'\]"):
        D.build_decoder("interleaved", {"stage2": {k: v for k, v in PRESET["stage2"].items() if k != "heads"}}, H, E,
                        META)
    with pytest.raises(ValueError, match="kmeans_meta lacks"):
        D.build_decoder("durations", PRESET, H, E, {"n_units": 10})
    with pytest.raises(ValueError, match="already registered"):
        D.register_decoder("durations")(type("Other", (D.DecoderBase,), {}))


def test_interleaved_checkpoint_round_trip_and_decoder_mismatch(tmp_path):
    model = tiny_model(seed=9)
    with torch.no_grad():
        model.emotion_mean.fill_(0.5)
    path = D.save_decoder(tmp_path / "decoder.pt", model)
    payload = T.load_checkpoint(path, "06_stage2.ipynb")
    assert payload["decoder"] == "interleaved"
    loaded = D.load_decoder(path)
    assert type(loaded) is I.InterleavedDecoder and loaded.config == model.config
    assert not loaded.training and torch.equal(loaded.emotion_mean, model.emotion_mean)
    h, e, emo = reply(5)
    for key in ("units", "pitch", "energy"):
        assert torch.equal(loaded.generate(h, e, emo)[key], model.generate(h, e, emo)[key])
    D.check_checkpoint(payload, model.config, path)  # same decoder and config: accepted
    with pytest.raises(T.CheckpointError, match="holds a 'interleaved' decoder.*stage2.decoder = 'durations'"):
        D.check_checkpoint(payload, durations_model().config, path)
    with pytest.raises(T.CheckpointError, match="read_tokens"):
        D.check_checkpoint(payload, tiny_config(read_tokens=4), path)
    assert I.InterleavedConfig.from_dict(model.config.to_dict()) == model.config
    with pytest.raises(ValueError, match="unknown InterleavedConfig keys"):
        I.InterleavedConfig.from_dict({**model.config.to_dict(), "lookahead_tokens": 1})
    with pytest.raises(ValueError, match="does not fit"):
        I.InterleavedDecoder(tiny_config(dim=32)).load_trainable_state(model.trainable_state())


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
def test_pipeline_streaming_decoder_drives_the_interleaved_decoder_like_generate(n):
    from emo_lib.pipeline import StreamingDecoder

    model = tiny_model(seed=3)
    h, e, emo = reply(n, seed=4)
    whole = model.generate(h, e, emo)
    streamer = StreamingDecoder(model)
    frames, released_at = [], []
    for i in range(n):
        out = streamer.push(h[i], e[i], emo[i])
        released_at += [i + 1] * len(out)
        frames += out
    frames += streamer.finish()
    assert all(t % model.config.read_tokens == 0 for t in released_at)  # a block only after every R-th token
    for key in ("units", "pitch", "energy"):
        got = torch.cat([torch.zeros(0, dtype=torch.long)] + [f[key] for f in frames])
        assert torch.equal(got, whole[key])
    assert sum(f["duration"] for f in frames) == len(whole["units"])
    with pytest.raises(D.DecoderInputError):
        streamer._writer.push(h[0] if n else torch.zeros(H), e[0] if n else torch.zeros(H), emo[0] if n else torch.zeros(E))
