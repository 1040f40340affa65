"""token2wav: frame arithmetic, flow-matching token2mel (training, exact streaming, lookahead), vocoders."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import functools
import math

import numpy as np
import pytest
import torch

from emo_lib import token2wav as T
from emo_lib.paths import MissingInputError
from emo_lib.pretrained import HiFiGANGenerator
from emo_lib.train import CheckpointError, save_checkpoint, train_loop

N_UNITS, PITCH_BINS, ENERGY_BINS = 12, 5, 3


def tiny_model(**overrides) -> T.Token2Mel:
    torch.manual_seed(0)
    config = dict(n_units=N_UNITS, pitch_bins=PITCH_BINS, energy_bins=ENERGY_BINS, dim=32, layers=2,
                  encoder_layers=2, heads=2, ff_mult=2, chunk_frames=8, lookahead_frames=3, ode_steps=4)
    config.update(overrides)
    return T.Token2Mel(T.Token2MelConfig(**config)).eval()


def tokens(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, N_UNITS, n), rng.integers(0, PITCH_BINS, n), rng.integers(0, ENERGY_BINS, n))


# A fixed "spectrum" per unit: a mel that is a deterministic function of the tokens, learnable quickly.
UNIT_SPECTRA = np.random.default_rng(99).normal(-5.0, 2.0, (N_UNITS, 80)).astype(np.float32)


def utterance(n_units: int, seed: int) -> dict:
    units, pitch, energy = tokens(n_units, seed)
    n_mel = T.mel_frames_for_units(n_units) - 2  # real audio gives a slightly shorter mel than the units cover
    index = np.minimum(T.unit_index_of_mel_frame(np.arange(n_mel)), n_units - 1)
    mel = UNIT_SPECTRA[units[index]].T + 0.3 * energy[index][None]
    return {"units": units, "pitch": pitch, "energy": energy, "mel": mel.astype(np.float32),
            "spk_ref": np.random.default_rng(seed).normal(-5.0, 1.0, 160).astype(np.float32)}


TINY_HIFIGAN = {"upsample_rates": [8, 8, 4], "upsample_kernel_sizes": [16, 16, 8], "upsample_initial_channel": 32,
                "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3], [1, 3]], "num_mels": 80,
                "n_fft": 1024, "hop_size": 256, "win_size": 1024, "sampling_rate": 22050, "fmin": 0, "fmax": 8000}


# --- frame arithmetic --------------------------------------------------------------------------
def test_mel_frames_and_index_map_follow_the_rates():
    for n in [1, 2, 7, 25, 128, 1000]:
        count = sum(1 for j in range(4 * n + 8) if math.floor(j * 256 / 22050 * 25) < n)
        assert T.mel_frames_for_units(n) == count
    assert T.mel_frames_for_units(25) == 87  # one second of units -> 86.13 mel frames, rounded up
    idx = T.mel_unit_index(20, 100)
    assert idx.tolist() == [math.floor(j * 256 / 22050 * 25) for j in range(20)]
    # a crop that starts at unit 7 reads the same units as the uncropped map, shifted by 7
    full = T.mel_unit_index(200, 100)
    m0 = T.mel_frames_for_units(7)
    assert torch.equal(T.mel_unit_index(40, 93, start_unit=7), full[m0 : m0 + 40] - 7)
    x = torch.arange(6.0)[None, :, None]
    up = T.upsample_to_mel(x, T.mel_frames_for_units(6))
    assert up.shape == (1, 21, 1) and up[0, :4, 0].tolist() == [0, 0, 0, 0] and up[0, -1, 0] == 5


def test_batch_crops_keep_mel_and_units_aligned():
    rng = np.random.default_rng(0)
    items = []
    for n_units, seed in [(60, 1), (9, 2), (45, 3)]:
        item = utterance(n_units, seed)
        index = np.minimum(T.unit_index_of_mel_frame(np.arange(item["mel"].shape[1])), n_units - 1)
        item["mel"][0] = item["units"][index]  # bin 0 spells out the unit each frame belongs to
        items.append(item)
    for _ in range(10):
        batch = T.token2mel_batch(items, crop_frames=50, rng=rng)
        assert batch["mel"].shape == (3, 80, 50) and batch["units"].shape[0] == 3
        assert batch["mel_mask"].sum(1).tolist() == [50, items[1]["mel"].shape[1], 50]
        for i in range(3):
            valid = batch["mel_mask"][i]
            read = batch["units"][i][batch["unit_index"][i][valid]]
            assert torch.equal(read.float(), batch["mel"][i, 0, valid])  # every frame reads its own unit
            assert batch["unit_index"][i][0] == 0  # crops start at a unit boundary
        assert torch.all(batch["mel"][1, :, items[1]["mel"].shape[1]:] == T.LOG_MEL_FLOOR)
    with pytest.raises(T.Token2MelError, match="item 0"):
        T.token2mel_batch([{**items[0], "pitch": items[0]["pitch"][:-1]}], 50, rng)


# --- model -------------------------------------------------------------------------------------
def test_shapes_loss_terms_and_config_round_trip():
    model = tiny_model()
    units, pitch, energy = tokens(11)
    spk = torch.randn(160)
    mel = model.sample(units, pitch, energy, spk, generator=torch.Generator().manual_seed(0))
    assert mel.shape == (1, 80, T.mel_frames_for_units(11)) and torch.isfinite(mel).all()
    assert model.prior(units, pitch, energy, spk).shape == mel.shape
    batch = T.token2mel_batch([utterance(11, 0), utterance(7, 1)], 64, np.random.default_rng(0))
    terms = model.loss(**batch, generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"loss", "flow", "prior"}
    assert torch.allclose(terms["loss"], terms["flow"] + terms["prior"])
    # padded utterances: frames past each length are silence (the rest: test_padding_does_not_change_the_real_frames)
    both = model.sample(np.stack([units, units]), np.stack([pitch, pitch]), np.stack([energy, energy]), spk,
                        noise=torch.randn(2, 80, mel.shape[-1]), unit_lengths=[11, 6])
    short = T.mel_frames_for_units(6)
    assert torch.all(both[1, :, short:] == T.LOG_MEL_FLOOR)
    assert T.Token2MelConfig.from_dict(model.config.to_dict()) == model.config
    with pytest.raises(T.Token2MelError, match="chunk_size"):
        T.Token2MelConfig.from_dict({**model.config.to_dict(), "chunk_size": 4})
    with pytest.raises(T.Token2MelError, match="unit id 12 is outside"):
        model.sample(np.array([1, 12, 3]), pitch[:3], energy[:3], spk)


@pytest.mark.parametrize("encoder", T.ENCODERS)
def test_padding_does_not_change_the_real_frames(encoder):
    model = tiny_model(encoder=encoder)
    units, pitch, energy = tokens(10)
    spk = torch.randn(160)
    n = T.mel_frames_for_units(10)
    noise = torch.randn(1, 80, T.mel_frames_for_units(16))
    alone = model.sample(units, pitch, energy, spk, noise=noise[..., :n])
    pad = np.zeros(6, dtype=np.int64)
    padded = model.sample(np.concatenate([units, pad + 3]), np.concatenate([pitch, pad]),
                          np.concatenate([energy, pad]), spk, noise=noise, unit_lengths=[10])
    assert torch.allclose(padded[..., :n], alone, atol=1e-4)


@pytest.mark.parametrize("encoder", T.ENCODERS)
def test_overfitting_two_utterances_lowers_the_loss(encoder):
    model = tiny_model(dim=48, encoder=encoder).train()
    items = [utterance(30, 0), utterance(24, 1)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(60):
        terms = T.loss_fn(model, items, step=step, crop_frames=64)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    first = np.mean([h["loss"] for h in history[:5]])
    last = np.mean([h["loss"] for h in history[-5:]])
    assert last < 0.5 * first, (first, last)
    assert np.mean([h["prior"] for h in history[-5:]]) < 0.3 * np.mean([h["prior"] for h in history[:5]])


@pytest.mark.parametrize("encoder", T.ENCODERS)
@pytest.mark.parametrize("prior_source", [False, True])
@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_streaming_chunks_equal_offline_sampling(solver, prior_source, encoder):
    model = tiny_model(prior_source=prior_source, source_std=0.5, encoder=encoder)
    units, pitch, energy = tokens(23)  # 80 mel frames: 10 chunks of 8
    spk = torch.randn(160)
    offline = model.sample(units, pitch, energy, spk, solver=solver, generator=torch.Generator().manual_seed(3))
    chunks = list(model.stream(units, pitch, energy, spk, solver=solver, generator=torch.Generator().manual_seed(3)))
    assert [c.shape[-1] for c in chunks[:-1]] == [8] * (len(chunks) - 1)
    streamed = torch.cat(chunks, dim=-1)
    assert streamed.shape == offline.shape
    assert (streamed - offline).abs().max() < 1e-4


def test_ode_states_flow_forward_across_chunks_only():
    """Chunk 1 depends on chunk 0's noise (so a stream must keep past ODE states), never the reverse."""
    model = tiny_model()
    units, pitch, energy = tokens(14)
    spk = torch.randn(160)
    noise = torch.randn(1, 80, T.mel_frames_for_units(14))
    offline = model.sample(units, pitch, energy, spk, noise=noise)
    earlier, later = noise.clone(), noise.clone()
    earlier[..., :8] = torch.randn(1, 80, 8)
    later[..., 16:] = torch.randn(1, 80, noise.shape[-1] - 16)
    assert (model.sample(units, pitch, energy, spk, noise=earlier)[..., 8:16] - offline[..., 8:16]).abs().max() > 1e-3
    assert (model.sample(units, pitch, energy, spk, noise=later)[..., :16] - offline[..., :16]).abs().max() < 1e-5


def test_chunk_k_ignores_conditioning_beyond_its_lookahead():
    model = tiny_model()
    units, pitch, energy = tokens(30)
    spk = torch.randn(160)
    noise = torch.randn(1, 80, T.mel_frames_for_units(30))
    k = 1  # frames [8, 16); it may read conditioning up to frame 16 + 3 - 1 = 18, i.e. unit 5
    end = (k + 1) * 8
    last_unit = int(T.unit_index_of_mel_frame(end + 3 - 1))
    reference = model.sample(units, pitch, energy, spk, noise=noise)
    changed = units.copy()
    changed[last_unit + 1 :] = (changed[last_unit + 1 :] + 5) % N_UNITS
    after = model.sample(changed, pitch, energy, spk, noise=noise)
    assert (after[..., :end] - reference[..., :end]).abs().max() < 1e-5
    assert (after[..., end:] - reference[..., end:]).abs().max() > 1e-3  # later chunks do see it
    streamed = list(model.stream(changed[: last_unit + 1], pitch[: last_unit + 1], energy[: last_unit + 1], spk,
                                 noise=noise[..., : T.mel_frames_for_units(last_unit + 1)]))
    assert (torch.cat(streamed[: k + 1], -1) - reference[..., :end]).abs().max() < 1e-4
    inside = units.copy()
    inside[last_unit] = (inside[last_unit] + 5) % N_UNITS  # within the lookahead: chunk k must change
    moved = model.sample(inside, pitch, energy, spk, noise=noise)
    assert (moved[..., k * 8 : end] - reference[..., k * 8 : end]).abs().max() > 1e-4


# --- key/value-cached streaming ----------------------------------------------------------------
def test_cached_transformer_forward_equals_the_whole_sequence_forward():
    torch.manual_seed(0)
    net = T.BlockCausalTransformer(dim=32, layers=2, heads=2, ff_mult=2, dropout=0.0, chunk_frames=4).eval()
    x, cond = torch.randn(2, 22, 32), torch.randn(2, 32)
    with torch.no_grad():
        whole = net(x, cond)
        cache = net.new_cache()
        # one chunk, two chunks at once, one chunk, then a chunk and a partial one; positions continue
        pieces = [net(x[:, a:b], cond, cache=cache) for a, b in [(0, 4), (4, 12), (12, 16), (16, 22)]]
        assert len(cache) == 22
        assert (torch.cat(pieces, dim=1) - whole).abs().max() < 1e-5
        # restarting the rotary positions at 0 for each piece would not give the same numbers
        fresh = net(x[:, 4:8], cond, cache=net.new_cache())
        assert (fresh - whole[:, 4:8]).abs().max() > 1e-3
        half = net.new_cache()
        net(x[:, :3], cond, cache=half)
        with pytest.raises(T.Token2MelError, match="chunk boundary"):
            net(x[:, 3:8], cond, cache=half)
        with pytest.raises(T.Token2MelError, match="layers"):
            net(x[:, :4], cond, cache=T.KVCache(3))
        bounded = net.new_cache(max_frames=12)
        net(x[:, :8], cond, cache=bounded)
        net(x[:, 8:12], cond, cache=bounded)  # doubling would grow to 16; the bound keeps it at 12
        assert bounded._keys[0].shape[2] == 12
        with pytest.raises(T.Token2MelError, match="max_frames = 12"):
            net(x[:, 12:16], cond, cache=bounded)
    with pytest.raises(T.Token2MelError, match="no_grad"):
        net(x[:, :4], cond, cache=net.new_cache())


PUSH_PATTERNS = {"one_at_a_time": [1] * 23, "irregular": [0, 1, 5, 0, 2, 7, 3, 5, 0], "all_at_once": [23]}


@pytest.mark.parametrize("encoder", T.ENCODERS)
@pytest.mark.parametrize("prior_source", [False, True])
@pytest.mark.parametrize("pattern", sorted(PUSH_PATTERNS))
@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_streamer_equals_offline_sampling(solver, pattern, prior_source, encoder):
    model = tiny_model(prior_source=prior_source, source_std=0.5, encoder=encoder)
    units, pitch, energy = tokens(23)  # 80 mel frames: 10 chunks of 8
    spk = torch.randn(160)
    streamer = T.Token2MelStreamer(model, spk, generator=torch.Generator().manual_seed(3), max_frames=100,
                                   solver=solver)
    streamer.max_chunks_per_forward = 4  # the 9 chunks ready when pushed all at once: forwards of 4, 4 and 1
    chunks, at = [], 0
    for size in PUSH_PATTERNS[pattern]:
        chunks += streamer.push(units[at : at + size], pitch[at : at + size], energy[at : at + size])
        at += size
    chunks += streamer.finish()
    assert [tuple(c.shape) for c in chunks] == [(80, 8)] * 10
    offline = model.sample(units, pitch, energy, spk, solver=solver, noise=streamer.noise[..., :80])
    assert (torch.cat(chunks, dim=-1) - offline[0]).abs().max() < 1e-4
    with pytest.raises(T.Token2MelError, match="push after finish"):
        streamer.push(units[:1], pitch[:1], energy[:1])


def test_streamer_emits_each_chunk_as_soon_as_its_lookahead_units_arrived():
    model = tiny_model()  # chunk 8, lookahead 3
    units, pitch, energy = tokens(25)  # 87 mel frames: 10 full chunks and one of 7
    streamer = T.Token2MelStreamer(model, torch.randn(160), noise=torch.randn(80, 87))
    emitted_at = []  # the number of units received when each chunk came out
    for u in range(25):
        emitted_at += [u + 1] * len(streamer.push(units[u : u + 1], pitch[u : u + 1], energy[u : u + 1]))
    last = streamer.finish()
    emitted_at += ["finish"] * len(last)
    assert last[-1].shape == (80, 7)
    for k, when in enumerate(emitted_at):
        needed = int(T.unit_index_of_mel_frame((k + 1) * 8 + 3 - 1)) + 1  # units up to frame end_k + L - 1
        assert when == (needed if needed <= 25 else "finish"), (k, when, needed)
    assert emitted_at[:3] == [3, 6, 8] and emitted_at[-2:] == [24, "finish"]  # frames 10, 18, 26 read units 2, 5, 7


@pytest.mark.parametrize("encoder", T.ENCODERS)
def test_stream_is_the_streamer_for_a_batch_and_matches_the_recompute_reference(encoder):
    model = tiny_model(encoder=encoder)
    a, b = tokens(20, seed=1), tokens(20, seed=2)
    units, pitch, energy = (np.stack([x, y]) for x, y in zip(a, b))
    spk = torch.randn(2, 160)
    noise = torch.randn(2, 80, T.mel_frames_for_units(20))
    offline = model.sample(units, pitch, energy, spk, noise=noise)
    chunks = list(model.stream(units, pitch, energy, spk, noise=noise))
    assert [c.shape[:2] for c in chunks] == [(2, 80)] * len(chunks) and len(chunks) == 9
    assert (torch.cat(chunks, dim=-1) - offline).abs().max() < 1e-4
    reference = torch.cat(list(model.stream_recompute(units, pitch, energy, spk, noise=noise)), dim=-1)
    assert (torch.cat(chunks, dim=-1) - reference).abs().max() < 1e-4


@pytest.mark.parametrize("detach_prior", [False, True])
def test_detach_prior_keeps_the_flow_gradient_out_of_the_encoder(detach_prior):
    model = tiny_model(detach_prior=detach_prior).train()
    batch = T.token2mel_batch([utterance(11, 0)], 64, np.random.default_rng(0))
    model.loss(**batch, generator=torch.Generator().manual_seed(0))["flow"].backward()
    encoder_grad = sum(float(p.grad.abs().sum()) for p in model.encoder.parameters() if p.grad is not None)
    assert (encoder_grad == 0.0) == detach_prior
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.estimator.parameters())


def test_conv_encoder_is_causal_and_its_cache_continues_any_split_exactly():
    torch.manual_seed(0)
    encoder = T.CausalConvEncoder(dim=16, layers=3, kernel=4).eval()
    x, cond = torch.randn(2, 30, 16), torch.randn(2, 16)
    with torch.no_grad():
        whole = encoder(x, cond)
        changed = x.clone()
        changed[:, 20:] += 5.0  # the future changes ...
        assert torch.equal(encoder(changed, cond)[:, :20], whole[:, :20])  # ... the past does not
        assert not torch.allclose(encoder(changed, cond)[:, 20:], whole[:, 20:])
        for splits in ([30], [1, 1, 28], [7, 2, 0, 21], [3] * 10):
            cache, pieces, at = encoder.new_cache(), [], 0
            for n in splits:
                pieces.append(encoder(x[:, at : at + n], cond, cache=cache))
                at += n
            assert len(cache) == 30
            assert (torch.cat(pieces, dim=1) - whole).abs().max() < 1e-5, splits
    with pytest.raises(T.Token2MelError, match="padding mask"):
        encoder(x, cond, valid=torch.ones(2, 30, dtype=torch.bool), cache=encoder.new_cache())
    with pytest.raises(T.Token2MelError, match="encoder must be one of"):
        T.Token2MelConfig(n_units=4, pitch_bins=2, energy_bins=2, encoder="lstm")
    # checkpoints written before the choice existed load as the Transformer encoder they are
    legacy = {k: v for k, v in tiny_model().config.to_dict().items() if k not in ("encoder", "conv_kernel")}
    assert T.Token2MelConfig.from_dict(legacy).encoder == "transformer"


def test_streamer_rejects_bad_input_and_keeps_its_state():
    model = tiny_model()
    units, pitch, energy = tokens(10)
    spk = torch.randn(160)
    streamer = T.Token2MelStreamer(model, spk, noise=torch.randn(1, 80, 30))
    assert len(streamer.push(units[:5], pitch[:5], energy[:5])) == 1  # 18 frames known; chunk 0 needs 11
    with pytest.raises(T.Token2MelError, match="max_frames = 30"):
        streamer.push(units[5:], pitch[5:], energy[5:])  # 10 units need 35 frames of noise
    with pytest.raises(T.Token2MelError, match="unit id 12 is outside"):
        streamer.push([12], [0], [0])
    with pytest.raises(T.Token2MelError, match="same length"):
        streamer.push(units[5:7], pitch[5:6], energy[5:7])
    assert streamer.n_units == 5 and streamer.emitted == 8  # nothing was taken
    assert len(streamer.push(units[5:8], pitch[5:8], energy[5:8])) == 2  # and it goes on: 28 frames, chunks 1, 2
    with pytest.raises(T.Token2MelError, match="not both"):
        T.Token2MelStreamer(model, spk, noise=torch.randn(80, 30), generator=torch.Generator())
    with pytest.raises(T.Token2MelError, match="noise must have shape"):
        T.Token2MelStreamer(model, torch.randn(2, 160), noise=torch.randn(1, 80, 30))
    with pytest.raises(T.Token2MelError, match="solver"):
        T.Token2MelStreamer(model, spk, solver="rk4")
    assert T.Token2MelStreamer(model, spk, max_frames=10).finish() == []  # no units, nothing to say
    done = T.Token2MelStreamer(model, spk, max_frames=40)
    done.push(units, pitch, energy)
    done.finish()
    with pytest.raises(T.Token2MelError, match="already called"):
        done.finish()


def _count_frames(modules):
    """Forward hooks that add up the frames (dim -2 of the input) each module processes."""
    counts = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(_, inputs, __, name=name):
            counts[name] += inputs[0].shape[-2]
        handles.append(module.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize("solver, evaluations", [("euler", 4), ("midpoint", 8)])
def test_streamer_runs_each_frame_once_per_solver_evaluation(solver, evaluations):
    model = tiny_model()  # 4 steps
    units, pitch, energy = tokens(23)  # 80 frames, 10 chunks
    spk = torch.randn(160)
    noise = torch.randn(1, 80, 80)
    watched = {"velocity_input": model.input, "to_mu": model.to_mu}
    watched.update({f"estimator_{i}": block.qkv for i, block in enumerate(model.estimator.blocks)})
    watched.update({f"encoder_{i}": block.mlp for i, block in enumerate(model.encoder.blocks)})
    expected = {name: 80 * (1 if name.startswith(("encoder", "to_mu")) else evaluations) for name in watched}

    def frames_evaluated(run) -> dict:
        counts, handles = _count_frames(watched)
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
        return counts

    def stream_one_unit_at_a_time():
        streamer = T.Token2MelStreamer(model, spk, noise=noise, solver=solver)
        for u in range(23):
            streamer.push(units[u : u + 1], pitch[u : u + 1], energy[u : u + 1])
        streamer.finish()

    assert frames_evaluated(stream_one_unit_at_a_time) == expected
    assert frames_evaluated(lambda: model.sample(units, pitch, energy, spk, noise=noise, solver=solver)) == expected
    # the recomputing reference runs chunk k's prefix of 8 (k + 1) frames: 440 frames per evaluation, not 80
    recompute = frames_evaluated(lambda: list(model.stream_recompute(units, pitch, energy, spk, noise=noise,
                                                                      solver=solver)))
    assert recompute["velocity_input"] == 440 * evaluations and recompute["encoder_0"] == 440


# --- speaker reference -------------------------------------------------------------------------
def test_speaker_reference_uses_speech_frames_and_rejects_short_references():
    rng = np.random.default_rng(0)
    speech = rng.normal(-3.0, 1.0, (80, 120)).astype(np.float32)
    silence = np.full((80, 200), math.log(1e-5), dtype=np.float32)
    ref = T.speaker_reference(np.concatenate([silence[:, :100], speech, silence[:, 100:]], axis=1))
    assert ref.shape == (160,)
    assert torch.allclose(ref[:80], torch.from_numpy(speech.mean(1)), atol=1e-4)  # silence excluded
    assert torch.allclose(ref[80:], torch.from_numpy(speech.std(1)), atol=1e-4)
    with pytest.raises(T.SpeakerReferenceError, match=r"too short: 0\.4 s of speech, need at least 1\.0 s"):
        T.speaker_reference(np.concatenate([silence, speech[:, :35]], axis=1))


# --- vocoders ----------------------------------------------------------------------------------
def test_mel_config_mismatch_names_both_settings():
    T.check_vocoder_config(T.MelConfig(), TINY_HIFIGAN)
    with pytest.raises(T.MelConfigError, match=r"hop = 300 but the vocoder's hop_size = 256"):
        T.check_vocoder_config(T.MelConfig(hop=300), TINY_HIFIGAN)
    with pytest.raises(T.MelConfigError, match=r"sr = 16000.*sampling_rate = 22050"):
        T.Vocoder(HiFiGANGenerator(TINY_HIFIGAN), T.MelConfig(sr=16000))


def test_vocoder_wrapper_and_streaming_with_a_tiny_generator():
    torch.manual_seed(0)
    vocoder = T.Vocoder(HiFiGANGenerator(TINY_HIFIGAN), context_frames=6, right_context_frames=4,
                        crossfade_samples=128)
    mel = torch.randn(80, 40) - 5
    wav = vocoder(mel)
    assert wav.dtype == np.float32 and wav.shape == (40 * 256,)
    assert vocoder(mel[None].repeat(2, 1, 1)).shape == (2, 40 * 256)
    one = np.concatenate(list(vocoder.stream([mel])))
    assert np.allclose(one, wav, atol=1e-6)  # a single chunk is offline vocoding
    pieces = list(vocoder.stream(mel.split(7, dim=-1)))
    assert len(pieces) == 7 and np.concatenate(pieces).shape == wav.shape  # 6 chunks + the held-back tail
    assert len(pieces[0]) == (7 - 4) * 256 - 128  # right context and cross-fade samples are held back
    with pytest.raises(ValueError, match="crossfade_samples"):
        T.Vocoder(HiFiGANGenerator(TINY_HIFIGAN), context_frames=1, crossfade_samples=512)


def test_vocoder_blocks_send_the_first_chunk_alone_then_blocks_and_keep_every_frame():
    chunks = [torch.randn(80, n) for n in (24, 24, 0, 24, 24, 24, 10)]
    blocks = list(T.vocoder_blocks(iter(chunks), block_frames=48))
    assert [b.shape[-1] for b in blocks] == [24, 48, 48, 10]  # first alone, then >= 48, the rest at the end
    assert torch.equal(torch.cat(blocks, dim=-1), torch.cat(chunks, dim=-1))
    assert [b.shape[-1] for b in T.vocoder_blocks(chunks, block_frames=1)] == [24, 24, 24, 24, 24, 10]
    assert list(T.vocoder_blocks([], block_frames=48)) == []
    with pytest.raises(ValueError, match="block_frames"):
        list(T.vocoder_blocks(chunks, block_frames=0))
    # blocks through the streaming vocoder give the same audio length as chunks do
    vocoder = T.Vocoder(HiFiGANGenerator(TINY_HIFIGAN), context_frames=6, right_context_frames=4)
    mel = torch.randn(80, 70) - 5
    pieces = list(vocoder.stream(T.vocoder_blocks(mel.split(12, dim=-1), block_frames=30)))
    assert np.concatenate(pieces).shape == (70 * 256,)


def test_griffin_lim_returns_audio_of_the_right_length_and_pitch():
    from emo_lib.audio import hifigan_log_mel

    sr = 22050
    t = np.arange(sr // 2) / sr
    mel = hifigan_log_mel((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr)
    wav = T.griffin_lim(mel, n_iter=16)
    assert wav.dtype == np.float32 and wav.shape == (mel.shape[1] * 256,) and np.isfinite(wav).all()
    spectrum = np.abs(np.fft.rfft(wav))
    peak_hz = np.argmax(spectrum) * sr / len(wav)
    assert abs(peak_hz - 440) < 30, peak_hz
    with pytest.raises(T.MelConfigError, match=r"\(80, T\)"):
        T.griffin_lim(np.zeros((40, 10)))


def test_streamed_packaged_hifigan_is_close_to_offline():
    from emo_lib.audio import hifigan_log_mel
    from emo_lib.pretrained import load_vocoder

    generator = load_vocoder("packaged:hifigan-universal")
    sr = 22050
    t = np.arange(int(0.8 * sr)) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 1.5 * t)
    wav = sum(np.sin(2 * np.pi * np.cumsum(k * f0) / sr) / k for k in range(1, 8)).astype(np.float32) * 0.2
    mel = hifigan_log_mel(wav, sr)[:, :60]
    offline = T.Vocoder(generator)(mel)

    def error(**settings) -> float:
        pieces = list(T.Vocoder(generator, **settings).stream(mel.split(24, dim=-1)))
        streamed = np.concatenate(pieces)
        assert streamed.shape == offline.shape
        return float(np.sqrt(np.mean((streamed - offline) ** 2)) / np.sqrt(np.mean(offline**2)))

    assert error() < 0.01  # defaults: 12 frames of left context, 12 held back for the right context
    assert error(context_frames=12, right_context_frames=0) > 0.1  # chunk ends without right context are wrong
    assert error(context_frames=12, right_context_frames=0, crossfade_samples=2048) < error(
        context_frames=12, right_context_frames=0)


def test_bfloat16_vocoding_stays_close_to_float32_and_precision_is_checked():
    from emo_lib.audio import hifigan_log_mel
    from emo_lib.presets import load_preset
    from emo_lib.pretrained import load_vocoder

    generator = load_vocoder("packaged:hifigan-universal")
    sr = 22050
    t = np.arange(int(0.8 * sr)) / sr
    wav = sum(np.sin(2 * np.pi * k * 160 * t) / k for k in range(1, 8)).astype(np.float32) * 0.2
    mel = hifigan_log_mel(wav, sr)[:, :60]
    full = T.Vocoder(generator)(mel)
    half = T.Vocoder(generator, precision="bfloat16")(mel)
    assert half.dtype == np.float32 and half.shape == full.shape
    rel = float(np.sqrt(np.mean((half - full) ** 2)) / np.sqrt(np.mean(full**2)))
    assert 0 < rel < 0.1, rel  # bfloat16 changes the waveform a little, not a lot
    auto = T.Vocoder(generator, precision="auto")
    assert auto.requested_precision == "auto"
    assert auto.precision == ("bfloat16" if T.native_bfloat16("cpu") else "float32")
    with pytest.raises(ValueError, match="float16"):
        T.Vocoder(generator, precision="float16")
    cfg = load_preset("smoke")
    vocoder = T.Vocoder.from_preset(cfg)
    assert vocoder.precision == T.resolve_precision(cfg["synthesis"]["vocoder_precision"], "cpu")
    assert vocoder.context_frames == vocoder.right_context_frames == cfg["token2mel"]["vocoder_context_frames"]


# --- checkpoints and the training loop ---------------------------------------------------------
def test_save_load_round_trip_and_errors(tmp_path):
    model = tiny_model()
    model.set_mel_stats(np.full(80, -4.0), np.full(80, 2.0))
    path = T.save_token2mel(tmp_path / "t2m.pt", model, history={"loss": [1.0]})
    loaded = T.load_token2mel(path)
    assert loaded.config == model.config and torch.equal(loaded.mel_mean, model.mel_mean)
    units, pitch, energy = tokens(9)
    spk = torch.randn(160)
    a = model.sample(units, pitch, energy, spk, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(units, pitch, energy, spk, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(MissingInputError, match="05_tokens"):
        T.load_token2mel(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "other.pt", {"kind": "stage1", "config": {}, "state": {}})
    with pytest.raises(CheckpointError, match="not a token2mel checkpoint"):
        T.load_token2mel(tmp_path / "other.pt")
    with pytest.raises(T.Token2MelError, match="shape"):
        tiny_model(dim=16, heads=2).load_trainable_state(model.trainable_state())


def test_train_loop_resume_replays_crops_and_noise(tmp_path):
    items = [utterance(20 + i, i) for i in range(4)]
    cfg = {"steps": 4, "batch_size": 2, "lr": {"token2mel": 1e-3}, "weight_decay": {"token2mel": 0.0},
           "warmup_steps": 1, "eval_every": 100, "checkpoint_every": 100, "seed": 0}

    def run(folder, stop_after=None):
        model = tiny_model().train()
        return train_loop(model, model.parameter_groups(), items, T.loss_fn, cfg, checkpoint_dir=folder,
                          payload_fn=T.checkpoint_payload, progress=False, stop_after=stop_after), model

    straight, _ = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=2)
    resumed, model = run(tmp_path / "b")
    assert np.allclose(resumed["loss"], straight["loss"], atol=1e-5)
    assert set(straight) >= {"flow", "prior"}
    loaded = T.load_token2mel(tmp_path / "b" / "latest.pt")
    for k, v in model.trainable_state().items():
        assert torch.equal(v, loaded.trainable_state()[k])


def test_token2mel_trains_in_cpu_bfloat16_autocast_where_native(tmp_path, monkeypatch, autocast_calls):
    """The cpu preset's ``token2mel.cpu_bf16``: train_loop autocasts the matrix products to bfloat16 on a CPU
    that computes it natively; the weights stay float32 and the model learns as in float32."""
    import emo_lib.token2wav as T2W

    monkeypatch.setattr(T2W, "native_bfloat16", lambda device="cpu": True)
    seen = autocast_calls
    items = [utterance(30, 0), utterance(24, 1)]
    cfg = {"steps": 60, "batch_size": 2, "lr": {"token2mel": 3e-3}, "weight_decay": {"token2mel": 0.0},
           "warmup_steps": 1, "eval_every": 1000, "checkpoint_every": 1000, "seed": 0, "cpu_bf16": True}
    model = tiny_model(dim=48).train()
    history = train_loop(model, model.parameter_groups(), items, functools.partial(T.loss_fn, crop_frames=64), cfg,
                         checkpoint_dir=tmp_path, payload_fn=T.checkpoint_payload, progress=False)
    assert seen and all(s == ("cpu", torch.bfloat16, True) for s in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    first, last = np.mean(history["loss"][:5]), np.mean(history["loss"][-5:])
    assert last < 0.5 * first, (first, last)  # the bound of the float32 overfitting test
    assert np.mean(history["prior"][-5:]) < 0.3 * np.mean(history["prior"][:5])


def test_resuming_with_another_configuration_is_refused():
    config = T.Token2MelConfig(n_units=8, pitch_bins=5, energy_bins=3, dim=32, layers=1, encoder_layers=1, heads=2)
    payload = T.checkpoint_payload(T.Token2Mel(config))
    T.check_checkpoint(payload, config, "latest.pt")  # same configuration: accepted
    other = T.Token2MelConfig(**{**config.to_dict(), "chunk_frames": 12})
    with pytest.raises(CheckpointError, match="chunk_frames: 24 in the checkpoint, 12 now"):
        T.check_checkpoint(payload, other, "latest.pt")


def test_references_come_from_another_utterance_of_the_same_speaker():
    keys = ["a1", "a2", "a3", "b1", "b2", "c1"]
    speakers = ["a", "a", "a", "b", "b", "c"]
    chosen = T.pick_references(keys, speakers, usable=set(keys) - {"a3"}, seed=0)
    assert set(chosen) == {"a1", "a2", "a3", "b1", "b2"}  # c has nobody else: left out
    for key, ref in chosen.items():
        assert ref != key and ref[0] == key[0] and ref != "a3"
    assert chosen == T.pick_references(keys, speakers, usable=set(keys) - {"a3"}, seed=0)  # seeded


def test_a_prior_centred_flow_starts_at_the_prior_mean():
    """With prior_source, a flow whose velocity is zero returns mu + source_std * noise; without, just the noise."""
    units, pitch, energy = tokens(23)
    spk = torch.randn(160)
    noise = torch.randn(1, 80, T.mel_frames_for_units(23), generator=torch.Generator().manual_seed(0))
    for prior_source in (False, True):
        model = tiny_model(prior_source=prior_source, source_std=0.3)
        with torch.no_grad():
            model.to_velocity.weight.zero_()
            model.to_velocity.bias.zero_()
        mel = model.sample(units, pitch, energy, spk, noise=noise)
        mu = model.normalize(model.prior(units, pitch, energy, spk))
        expected = model.denormalize(0.3 * noise + (mu if prior_source else 0.0))
        assert (mel - expected).abs().max() < 1e-4


def test_sampling_temperature_scales_the_starting_noise_and_not_the_training_loss():
    """Synthesis starts at mu + temperature * source_std * noise; training always at temperature 1."""
    units, pitch, energy = tokens(23)
    spk = torch.randn(160)
    noise = torch.randn(1, 80, T.mel_frames_for_units(23), generator=torch.Generator().manual_seed(0))
    for temperature in (0.0, 0.5, 1.0):
        model = tiny_model(prior_source=True, source_std=0.3, temperature=temperature)
        with torch.no_grad():
            model.to_velocity.weight.zero_()
            model.to_velocity.bias.zero_()
        mel = model.sample(units, pitch, energy, spk, noise=noise)
        mu = model.normalize(model.prior(units, pitch, energy, spk))
        assert (mel - model.denormalize(mu + temperature * 0.3 * noise)).abs().max() < 1e-4
    cold = tiny_model(prior_source=True, source_std=0.3, temperature=0.0)  # trained weights untouched here
    other = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(cold.sample(units, pitch, energy, spk, noise=noise),
                          cold.sample(units, pitch, energy, spk, noise=other), atol=1e-5)  # deterministic ODE
    item = utterance(30, 0)
    batch = T.token2mel_batch([item], crop_frames=64, rng=np.random.default_rng(0))
    losses = []
    for temperature in (0.0, 1.0):
        model = tiny_model(prior_source=True, source_std=0.3, temperature=temperature)
        model.set_mel_stats(np.full(80, -4.0), np.full(80, 2.0))
        out = model.loss(**batch, generator=torch.Generator().manual_seed(5))
        losses.append(out["loss"].item())
    assert losses[0] == losses[1]
    with pytest.raises(T.Token2MelError, match="temperature"):
        tiny_model(temperature=-0.5)


@pytest.mark.parametrize("temperature", [0.0, 0.4])
def test_streaming_at_a_lower_temperature_still_equals_offline(temperature):
    model = tiny_model(prior_source=True, source_std=0.5, temperature=temperature)
    units, pitch, energy = tokens(23)
    spk = torch.randn(160)
    streamer = T.Token2MelStreamer(model, spk, generator=torch.Generator().manual_seed(3), max_frames=100)
    chunks = streamer.push(units, pitch, energy) + streamer.finish()
    offline = model.sample(units, pitch, energy, spk, noise=streamer.noise[..., :80])
    assert (torch.cat(chunks, dim=-1) - offline[0]).abs().max() < 1e-4


def test_temperature_is_a_sampling_setting_a_checkpoint_does_not_pin(tmp_path):
    model = tiny_model(prior_source=True, source_std=0.5)
    model.set_mel_stats(np.full(80, -4.0), np.full(80, 2.0))
    path = T.save_token2mel(tmp_path / "t2m.pt", model)
    T.check_checkpoint(T.checkpoint_payload(model), T.Token2MelConfig(**{**model.config.to_dict(), "temperature": 0.0}),
                       path)  # resuming with another temperature: accepted
    assert T.load_token2mel(path).config.temperature == 1.0
    cold = T.load_token2mel(path, temperature=0.0)
    assert cold.config.temperature == 0.0
    units, pitch, energy = tokens(9)
    spk = torch.randn(160)
    noise = torch.randn(1, 80, T.mel_frames_for_units(9), generator=torch.Generator().manual_seed(2))
    warm = model.sample(units, pitch, energy, spk, noise=noise)
    assert not torch.allclose(cold.sample(units, pitch, energy, spk, noise=noise), warm)
    saved = dict(T.checkpoint_payload(model)["config"])
    saved.pop("temperature")  # a checkpoint from before the setting existed loads at temperature 1
    assert T.Token2MelConfig.from_dict(saved).temperature == 1.0


def test_stream_speech_streams_the_offline_mel_and_times_the_first_audio():
    model = tiny_model(prior_source=True, source_std=0.5)  # chunk 8
    torch.manual_seed(1)
    vocoder = T.Vocoder(HiFiGANGenerator(TINY_HIFIGAN), context_frames=6, right_context_frames=4)
    units, pitch, energy = tokens(23)  # 80 mel frames: 10 chunks of 8
    spk = torch.randn(160)
    noise = torch.randn(1, 80, 80, generator=torch.Generator().manual_seed(4))
    offline = model.sample(units, pitch, energy, spk, noise=noise)[0]
    by_chunk = T.stream_speech(model, vocoder, units, pitch, energy, spk, noise=noise)
    blocked = T.stream_speech(model, vocoder, units, pitch, energy, spk, noise=noise, block_frames=24)
    for out in (by_chunk, blocked):
        assert out.chunks == 10 and (out.mel - offline).abs().max() < 1e-4
        assert out.audio.shape == (80 * 256,)
        assert 0 < out.first_audio_s <= out.seconds
        assert out.real_time_factor == pytest.approx(out.seconds / (80 * 256 / 22050))
    reference = vocoder(offline)
    rms = lambda x: float(np.sqrt(np.mean(x**2)))
    errors = [rms(out.audio - reference) / rms(reference) for out in (by_chunk, blocked)]
    assert errors[1] <= errors[0] < 1e-3  # fewer seams in blocks; both close to offline vocoding


# -- the unit embedding table from the k-means centroids ------------------------------------------
def test_centroid_init_keeps_which_units_sound_alike():
    """After init_unit_embedding, units close in Whisper's space are close in the table (PCA keeps the geometry)."""
    rng = np.random.default_rng(3)
    # 12 centroids in 4 well-separated families of 3 (a 40-d frame space), as k-means gives for phone-like states
    families = rng.normal(0, 5.0, (4, 40))
    centroids = np.repeat(families, 3, axis=0) + rng.normal(0, 0.3, (N_UNITS, 40))
    model = tiny_model()
    random_table = model.unit_embedding.weight.detach().clone()
    model.start_unit_embedding("centroids", torch.as_tensor(centroids, dtype=torch.float32))
    table = model.unit_embedding.weight.detach()
    assert table.shape == (N_UNITS, 32) and torch.isfinite(table).all()
    assert abs(float(table[:, :N_UNITS].std()) - 1.0) < 0.05  # the scale of nn.Embedding's default init
    assert torch.count_nonzero(table[:, N_UNITS:]) == 0  # 12 centroids span at most 11 directions: the rest is zero

    def nearest_is_in_family(t: torch.Tensor) -> float:
        d = torch.cdist(t, t) + torch.eye(N_UNITS) * 1e9
        return float((d.argmin(1) // 3 == torch.arange(N_UNITS) // 3).float().mean())

    assert nearest_is_in_family(table) == 1.0  # every unit's nearest neighbour is of its own family
    assert nearest_is_in_family(random_table) < 0.5  # a random table knows nothing of it
    # pairwise distances follow the centroids' (PCA keeps all the variance when dim >= n_units)
    d_table = torch.pdist(table).numpy()
    d_centroids = torch.pdist(torch.as_tensor(centroids)).numpy()
    assert np.corrcoef(d_table, d_centroids)[0, 1] > 0.999
    assert any(p is model.unit_embedding.weight for p in model.parameter_groups()["token2mel"])  # still trained


def test_centroid_init_refuses_a_mismatched_vocabulary_and_unknown_choices():
    model = tiny_model()
    before = model.unit_embedding.weight.detach().clone()
    with pytest.raises(T.Token2MelError, match="one centroid per unit"):
        model.init_unit_embedding(torch.randn(N_UNITS + 1, 40))
    with pytest.raises(T.Token2MelError, match="NaN"):
        model.init_unit_embedding(torch.full((N_UNITS, 40), float("nan")))
    with pytest.raises(T.Token2MelError, match="unit_init must be one of"):
        model.start_unit_embedding("pca")
    with pytest.raises(T.Token2MelError, match="needs the k-means centroids"):
        model.start_unit_embedding("centroids")
    model.start_unit_embedding("random", torch.randn(N_UNITS, 40))  # the default: the table is left alone
    assert torch.equal(model.unit_embedding.weight.detach(), before)
