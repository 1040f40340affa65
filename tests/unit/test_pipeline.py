"""The end-to-end pipeline with tiny random components: streamed == offline, event order, edge cases."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from emo_lib import decoder as D
from emo_lib import llm as L
from emo_lib import pipeline as P
from emo_lib import token2wav as T2W
from emo_lib.audio import AudioError
from emo_lib.pretrained import HiFiGANGenerator
from tiny_models import tiny_llm, tiny_speech_decoder  # tests/unit/tiny_models.py; the tokenizer fixture is in conftest.py

SEMANTIC, EMOTION = 12, 6
N_UNITS, PITCH_BINS, ENERGY_BINS = 10, 5, 3
TINY_HIFIGAN = {"upsample_rates": [8, 8, 4], "upsample_kernel_sizes": [16, 16, 8], "upsample_initial_channel": 32,
                "resblock_kernel_sizes": [3, 5], "resblock_dilation_sizes": [[1, 3], [1, 3]], "num_mels": 80,
                "n_fft": 1024, "hop_size": 256, "win_size": 1024, "sampling_rate": 22050, "fmin": 0, "fmax": 8000}


# -- tiny components (the fixture style of test_llm.py, test_decoder.py and test_token2wav.py) ----------


def tiny_stage1(tokenizer, seed=0):
    config = L.Stage1Config(semantic_dim=SEMANTIC, emotion_dim=EMOTION, head_width=16, head_layers=1, head_heads=2)
    torch.manual_seed(seed)
    return L.build_speech_llm(config, tiny_llm(tokenizer, seed), tokenizer).eval()


def tiny_decoder(seed=0, frames_per_token=4, hidden_dim=32, **overrides):
    sizes = dict(n_units=N_UNITS, pitch_bins=PITCH_BINS, energy_bins=ENERGY_BINS)
    model = tiny_speech_decoder(hidden_dim, EMOTION, seed=seed, **{**sizes, **overrides})
    with torch.no_grad():
        model.duration_predictor.out.weight.mul_(0.2)  # about `frames_per_token` frames per token
        model.duration_predictor.out.bias.fill_(math.log1p(frames_per_token))
    return model


def tiny_token2mel():
    torch.manual_seed(0)
    return T2W.Token2Mel(T2W.Token2MelConfig(n_units=N_UNITS, pitch_bins=PITCH_BINS, energy_bins=ENERGY_BINS, dim=32,
                                             layers=2, encoder_layers=2, heads=2, chunk_frames=8,
                                             lookahead_frames=3, ode_steps=4)).eval()


def tiny_vocoder(**settings):
    torch.manual_seed(0)
    return T2W.Vocoder(HiFiGANGenerator(TINY_HIFIGAN), **settings)


PROJECTION = np.random.default_rng(7).normal(0, 3.0, (320, SEMANTIC + EMOTION)).astype(np.float32)


class FakeFeatures:
    """Stands in for Whisper + the emotion encoder: a fixed projection of each 20 ms frame; records inputs."""

    def __init__(self):
        self.lengths = []

    def __call__(self, wav16k):
        self.lengths.append(len(wav16k))
        t = -(-len(wav16k) // 320)
        frames = np.zeros(t * 320, dtype=np.float32)
        frames[: len(wav16k)] = wav16k
        z = frames.reshape(t, 320) @ PROJECTION
        return z[:, :SEMANTIC], z[:, SEMANTIC:]


def query(seconds=1.0, sr=16000, seed=0):
    rng = np.random.default_rng(seed)
    return (0.3 * rng.standard_normal(int(seconds * sr))).astype(np.float32)


def tiny_omni(tokenizer, max_new_tokens=10, **kwargs):
    kwargs.setdefault("max_reply_s", 5.0)
    return P.EmotionOmni(tiny_stage1(tokenizer), tiny_decoder(), tiny_token2mel(), tiny_vocoder(), FakeFeatures(),
                         torch.randn(160, generator=torch.Generator().manual_seed(1)) - 5.0,
                         max_new_tokens=max_new_tokens, **kwargs)


# -- stage 1 as a stream -------------------------------------------------------------------------------
def test_stream_reply_equals_generate_token_by_token(tokenizer):
    model = tiny_stage1(tokenizer)
    example = L.Stage1Example("q", *FakeFeatures()(query(0.8)))
    offline = model.generate([example], max_new_tokens=7, repetition_penalty=1.3)[0]
    steps = list(model.stream_reply(example, max_new_tokens=7, repetition_penalty=1.3))
    assert len(steps) == 7  # a random LLM does not stop by itself: max_new_tokens holds
    assert [s["token_id"] for s in steps] == offline["token_ids"]
    np.testing.assert_allclose(np.stack([s["hidden"] for s in steps]), offline["hidden"], atol=1e-5)
    # token i's emotion saw tokens <= i only, yet equals the head's output over the whole reply (causal head)
    np.testing.assert_allclose(np.stack([s["emotion"] for s in steps]), offline["emotion"], atol=1e-5)
    assert offline["text"] and "".join(s["text_piece"] for s in steps).strip() == offline["text"]
    assert all(s["hidden"].shape == (32,) and s["emotion"].shape == (EMOTION,) for s in steps)
    assert len(list(model.stream_reply(example, max_new_tokens=3))) == 3
    model.end_id = offline["token_ids"][0]  # the first choice is now <|im_end|>: an empty reply
    assert list(model.stream_reply(example, max_new_tokens=7, repetition_penalty=1.3)) == []


# -- token2mel for units that arrive piecemeal ---------------------------------------------------------
def test_incremental_token2mel_equals_sample_and_releases_chunks_early():
    model = tiny_token2mel()
    rng = np.random.default_rng(0)
    n_units = 31
    units, pitch, energy = (rng.integers(0, size, n_units) for size in (N_UNITS, PITCH_BINS, ENERGY_BINS))
    spk = torch.randn(160)
    streamer = P.IncrementalToken2Mel(model, spk, noise_seed=5, max_frames=200)
    chunks, released_after = [], []
    start = 0
    for size in [3, 0, 1, 7, 2, 5, 6, 4, 3]:  # uneven pieces, one empty
        out = streamer.push(units[start : start + size], pitch[start : start + size], energy[start : start + size])
        start += size
        chunks += out
        released_after.append(len(chunks))
        # chunk k = frames [8k, 8k + 8) leaves once the conditioning reaches 8k + 8 + lookahead 3
        available = T2W.mel_frames_for_units(start)
        assert len(chunks) == max(0, (available - 3) // 8), (start, available, len(chunks))
    assert start == n_units and released_after[-1] > 0
    tail = streamer.finish()
    assert tail, "the last chunk(s) can only be finalised at finish()"
    mel = torch.cat(chunks + tail, dim=-1)
    n = T2W.mel_frames_for_units(n_units)
    assert mel.shape == (1, 80, n) and all(c.shape[-1] == 8 for c in (chunks + tail)[:-1])
    offline = model.sample(units, pitch, energy, spk, noise=streamer.noise[..., :n])
    assert (mel - offline).abs().max() < 1e-4
    assert np.array_equal(streamer.tokens, np.stack([units, pitch, energy], 1))
    # the noise is a pure function of (seed, max_frames)
    assert torch.equal(P.IncrementalToken2Mel(model, spk, 5, 200).noise, streamer.noise)
    assert not torch.equal(P.IncrementalToken2Mel(model, spk, 6, 200).noise, streamer.noise)
    with pytest.raises(P.PipelineError, match="after finish"):
        streamer.push(units[:1], pitch[:1], energy[:1])


def test_incremental_token2mel_refuses_replies_longer_than_its_noise():
    model = tiny_token2mel()
    streamer = P.IncrementalToken2Mel(model, torch.randn(160), max_frames=20)
    streamer.push([1] * 5, [0] * 5, [0] * 5)  # 18 mel frames: fits
    with pytest.raises(P.PipelineError, match=r"reached 21 mel frames .* max_frames = 20"):
        streamer.push([1], [0], [0])
    assert P.IncrementalToken2Mel(model, torch.randn(160)).finish() == []  # 0 units: nothing, no crash
    with pytest.raises(P.PipelineError, match="one length"):
        P.IncrementalToken2Mel(model, torch.randn(160)).push([1, 2], [0], [0])


# -- push adapters for the pull-style stream generators ------------------------------------------------
def test_incremental_vocoder_gives_exactly_the_pieces_of_vocoder_stream():
    vocoder = tiny_vocoder(context_frames=6, right_context_frames=10, crossfade_samples=64)
    mel = torch.randn(80, 61) - 5
    chunks = list(mel.split(8, dim=-1))
    chunks.insert(3, mel[:, :0])  # an empty chunk is skipped
    expected = list(vocoder.stream(chunks))
    streamer = P.IncrementalVocoder(vocoder)
    got, live = [], 0
    for chunk in chunks:
        out = streamer.push(chunk)
        live += len(out)
        got += out
    got += streamer.finish()
    assert live == len(expected) - 1 > 0  # all but the held-back tail came out while chunks arrived
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    assert P.IncrementalVocoder(vocoder).finish() == []


def test_pump_catches_a_wrong_release_schedule():
    doubler = lambda items: (2 * x for x in items)  # noqa: E731  one output per input
    pump = P.Pump(doubler)
    assert pump.push(1, 1) == [2]
    with pytest.raises(RuntimeError, match="not been pushed yet"):
        pump.push(2, 2)
    pump = P.Pump(doubler)
    assert pump.push(1, 0) == [] and pump.push(2, 0) == []
    assert pump.finish() == [2, 4]
    with pytest.raises(P.PipelineError, match="after finish"):
        pump.push(3, 0)


# -- the whole system ----------------------------------------------------------------------------------
def test_streamed_reply_matches_offline_and_events_come_in_order(tokenizer):
    omni = tiny_omni(tokenizer, max_new_tokens=10)
    wav = query(1.0, sr=22050, seed=3)
    events = list(omni.respond(wav, 22050))
    done = events[-1]
    offline = omni.respond_offline(wav, 22050)
    # same reply, same speech tokens, same sound
    assert done["kind"] == "done" and done["note"] == "" and len(done["token_ids"]) == 10
    assert done["text"] == offline["text"] and done["token_ids"] == offline["token_ids"]
    np.testing.assert_allclose(done["emotion"], offline["emotion"], atol=1e-5)
    assert np.array_equal(done["units"], offline["units"]) and np.array_equal(done["durations"], offline["durations"])
    assert done["units"].shape == (int(done["durations"].sum()), 3) and len(done["units"]) > 20
    assert done["wav"].shape == offline["wav"].shape == (T2W.mel_frames_for_units(len(done["units"])) * 256,)
    rel = np.sqrt(np.mean((done["wav"] - offline["wav"]) ** 2)) / np.sqrt(np.mean(offline["wav"] ** 2))
    assert rel < 1e-3, rel
    # a different noise seed gives another rendering of the same units
    other = omni.respond_offline(wav, 22050, noise_seed=1)
    assert np.array_equal(other["units"], offline["units"]) and not np.allclose(other["wav"], offline["wav"])

    kinds = [e["kind"] for e in events]
    assert kinds[0] == "text" and kinds[-1] == "done" and kinds.count("done") == 1
    text_at = {e["token"]: i for i, e in enumerate(events) if e["kind"] == "text"}
    units_at = {e["token"]: i for i, e in enumerate(events) if e["kind"] == "units"}
    n = len(text_at)
    assert sorted(units_at) == list(range(n)) and sorted(units_at.values()) == [units_at[i] for i in range(n)]
    for i in range(n):  # token i's frames leave right after its look-ahead token is written, not later
        assert text_at[min(i + 1, n - 1)] < units_at[i]
        if i + 2 < n:
            assert units_at[i] < text_at[i + 2]
    audio = [i for i, k in enumerate(kinds) if k == "audio"]
    assert audio and audio[0] < text_at[n - 1], "speech must start before the reply is fully written"
    pieces = [events[i] for i in audio]
    assert np.array_equal(np.concatenate([p["wav"] for p in pieces]), done["wav"])
    starts = np.cumsum([0] + [len(p["wav"]) for p in pieces[:-1]]) / 22050
    np.testing.assert_allclose([p["start_s"] for p in pieces], starts)
    times = [e["t"] for e in events[:-1]]
    assert times == sorted(times) and done["first_audio_s"] == pieces[0]["t"] <= done["seconds"]
    assert done["rtf"] == pytest.approx(done["seconds"] / done["audio_s"])
    expected_stall = P.playback_stalls([(p["t"], p["start_s"], len(p["wav"]) / 22050) for p in pieces])
    assert done["stall_s"] == pytest.approx(expected_stall) and done["stall_s"] >= 0.0
    assert "".join(e["text_piece"] for e in events if e["kind"] == "text").strip() == done["text"]


def test_a_decoder_with_a_voice_input_gets_the_reply_voice_streaming_and_offline(tokenizer):
    voice = torch.randn(160, generator=torch.Generator().manual_seed(1)) - 5.0
    omni = P.EmotionOmni(tiny_stage1(tokenizer), tiny_decoder(speaker_dim=160), tiny_token2mel(), tiny_vocoder(),
                         FakeFeatures(), voice, max_new_tokens=6, max_reply_s=5.0)
    heard = []
    for name in ("generate", "stream"):  # record the voice each decoding path hands the decoder
        def spy(*args, _original=getattr(omni.decoder, name), **kwargs):
            heard.append(kwargs.get("speaker"))
            return _original(*args, **kwargs)
        setattr(omni.decoder, name, spy)
    wav = query(1.0, sr=22050, seed=3)
    streamed = P.collect(omni.respond(wav, 22050))
    offline = omni.respond_offline(wav, 22050)
    assert len(heard) == 2 and all(v is omni.voice for v in heard)
    assert np.array_equal(streamed["units"], offline["units"]) and len(streamed["units"]) > 0
    omni.decoder.generate = type(omni.decoder).generate.__get__(omni.decoder)
    from emo_lib.decoder import DecoderInputError

    with pytest.raises(DecoderInputError, match="pass speaker="):  # such a decoder refuses to guess the voice
        omni.decoder.generate(np.zeros((2, 32), np.float32), np.zeros((2, 32), np.float32), np.zeros((2, EMOTION), np.float32))


def test_an_empty_reply_ends_with_a_note_and_no_audio(tokenizer):
    omni = tiny_omni(tokenizer, max_new_tokens=6)
    wav = query(0.7)
    first = omni.stage1.generate([omni.listen(wav, 16000)], 1, omni.repetition_penalty)[0]["token_ids"][0]
    omni.stage1.end_id = first  # the LLM now ends its turn at once
    events = list(omni.respond(wav, 16000))
    assert [e["kind"] for e in events] == ["done"]
    for done in (events[0], omni.respond_offline(wav, 16000)):
        assert done["wav"].shape == (0,) and done["units"].shape == (0, 3) and done["emotion"].shape == (0, EMOTION)
        assert done["text"] == "" and "empty reply" in done["note"] and done["first_audio_s"] is None
        assert math.isnan(done["rtf"])


def test_listen_resamples_and_refuses_unusable_audio(tokenizer):
    omni = tiny_omni(tokenizer)
    example = omni.listen(query(1.0, sr=22050), 22050)
    assert omni.features.lengths == [16000]  # the encoders hear 16 kHz
    assert example.semantic.shape == (50, SEMANTIC) and example.emotion.shape == (50, EMOTION)
    with pytest.raises(AudioError, match="empty"):
        omni.listen(np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="silent"):
        omni.listen(np.zeros(8000, np.float32), 16000)
    with pytest.raises(AudioError, match=r"lasts 3\.0 s, more than the limit of 2\.0 s"):
        omni.listen(query(3.0), 16000, max_seconds=2.0)
    with pytest.raises(AudioError, match="silent"):
        omni.respond(np.zeros(8000, np.float32), 16000)  # at the call, before any event is asked for
    omni.features = lambda wav: (np.zeros((50, SEMANTIC)), np.zeros((49, EMOTION)))
    with pytest.raises(P.PipelineError, match="one length"):
        omni.listen(query(1.0), 16000)


def test_components_that_do_not_fit_are_refused_naming_both_sides(tokenizer):
    with pytest.raises(P.PipelineError, match="decoder hidden_dim = 12 but the LLM's hidden size = 32"):
        P.EmotionOmni(tiny_stage1(tokenizer), tiny_decoder(hidden_dim=12), tiny_token2mel(), tiny_vocoder(),
                      FakeFeatures(), torch.zeros(160))
    with pytest.raises(P.PipelineError, match="decoder n_units = 11 but token2mel n_units = 10"):
        P.EmotionOmni(tiny_stage1(tokenizer), tiny_decoder(n_units=11), tiny_token2mel(), tiny_vocoder(),
                      FakeFeatures(), torch.zeros(160))
    with pytest.raises(P.PipelineError, match=r"shape \(160,\)"):
        P.EmotionOmni(tiny_stage1(tokenizer), tiny_decoder(), tiny_token2mel(), tiny_vocoder(), FakeFeatures(),
                      torch.zeros(80))


# -- loading a run -------------------------------------------------------------------------------------
def test_from_run_loads_the_checkpoints_of_a_run(tokenizer, tmp_path, monkeypatch):
    from emo_lib import asr, encoders, pretrained
    from emo_lib.paths import RunDir
    from emo_lib.train import save_checkpoint

    run = RunDir("tiny", root=tmp_path)
    stage1 = tiny_stage1(tokenizer)
    with torch.no_grad():  # trained-looking LoRA and head, so a wrong load would show
        for name, p in stage1.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    save_checkpoint(run.checkpoint_dir("stage1") / "latest.pt", L.checkpoint_payload(stage1))
    D.save_decoder(run.checkpoint_dir("stage2") / "latest.pt", tiny_decoder())
    T2W.save_token2mel(run.checkpoint_dir("token2mel") / "latest.pt", tiny_token2mel())
    encoders.save_emotion_encoder(run.checkpoint_dir("emotion_encoder") / "latest.pt",
                                  encoders.EmotionEncoder(encoders.EmotionEncoderConfig(emotion_dim=EMOTION, layers=1)))
    seen = {}
    monkeypatch.setattr(pretrained, "load_llm", lambda source, device="cpu": (tiny_llm(tokenizer), tokenizer))
    monkeypatch.setattr(pretrained, "load_vocoder", lambda source, device="cpu": HiFiGANGenerator(TINY_HIFIGAN))
    whisper = SimpleNamespace(model=SimpleNamespace(encoder="whisper-encoder"))
    monkeypatch.setattr(asr, "load_whisper", lambda source, device="cpu": (whisper, "processor"))

    def fake_whisper_frames(encoder, processor, wavs):
        seen["whisper"] = (encoder, processor, [len(w) for w in wavs])
        return [FakeFeatures()(w)[0] for w in wavs]

    monkeypatch.setattr(encoders, "whisper_encoder_frames", fake_whisper_frames)
    cfg = {"seed": 3, "models": {"llm": "tiny", "vocoder": "tiny", "whisper": "tiny"}, "stage1": {"max_new_tokens": 4},
           "token2mel": {"vocoder_context_frames": 12, "reference_min_s": 1.0, "temperature": 0.25},
           "synthesis": {"voice": ""}}
    omni = P.EmotionOmni.from_run(run, cfg, voice=np.full(160, -5.0, np.float32), max_reply_s=5.0)
    assert (omni.max_new_tokens, omni.noise_seed, omni.vocoder.right_context_frames) == (4, 3, 12)
    assert omni.token2mel.config.temperature == 0.25  # the preset's sampling temperature, not the checkpoint's
    example = omni.listen(query(1.0), 16000)
    assert seen["whisper"] == ("whisper-encoder", "processor", [16000])
    assert example.emotion.shape == (50, EMOTION)  # the run's (tiny) emotion encoder
    expected = stage1.generate([example], 4)[0]
    reply = omni.respond_offline(query(1.0), 16000)
    assert reply["token_ids"] == expected["token_ids"]  # the saved LoRA weights were loaded
    np.testing.assert_allclose(reply["emotion"], expected["emotion"], atol=1e-5)


def test_run_voice_takes_the_longest_usable_utterance_of_the_speaker(tmp_path):
    from emo_lib.audio import load_audio, save_wav
    from emo_lib.paths import RunDir

    run = RunDir("voices", root=tmp_path).make()
    sr = 22050

    def tone(seconds, hz):
        t = np.arange(int(seconds * sr)) / sr
        return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)

    rows = []
    for i, (speaker, seconds, hz) in enumerate([("f2", 0.5, 300), ("f2", 2.0, 220), ("m1", 3.0, 120)]):
        path = f"data/wavs/{i}.wav"
        save_wav(run.root / path, tone(seconds, hz), sr)
        rows.append({"pair_id": str(i), "kept": True, "split": "train", "query_speaker": "x", "query_wav": None,
                     "query_duration_s": None, "response_speaker": speaker, "response_wav": path,
                     "response_duration_s": seconds})
    rows += [{**rows[-1], "pair_id": "3"}, {**rows[-1], "pair_id": "4"}]  # m1 is the most frequent reply speaker
    run.manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    voice = P.run_voice(run, "f2")
    assert voice.shape == (160,)
    reference = lambda i: P.voice_from_wav(*load_audio(run.root / f"data/wavs/{i}.wav"))  # noqa: E731
    assert torch.allclose(voice, reference(1))  # f2's 2 s utterance; the 0.5 s one is too short
    assert torch.allclose(P.run_voice(run, ""), reference(2))  # m1: most frequent reply speaker
    assert (reference(2) - voice).abs().max() > 1.0
    with pytest.raises(P.PipelineError, match=r"speaker 'zz'.*speakers: \['f2', 'm1', 'x'\]"):
        P.run_voice(run, "zz")


def test_run_voice_prefers_a_neutral_reference(tmp_path):
    from emo_lib.audio import load_audio, save_wav
    from emo_lib.paths import RunDir

    run = RunDir("voices", root=tmp_path).make()
    sr = 22050
    rows = []
    for i, (emotion, seconds, hz) in enumerate([("anger", 3.0, 300), ("neutral", 1.5, 180), ("sadness", 2.5, 120)]):
        path = f"data/wavs/{i}.wav"
        t = np.arange(int(seconds * sr)) / sr
        save_wav(run.root / path, (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32), sr)
        rows.append({"pair_id": str(i), "kept": True, "split": "train", "query_speaker": "x", "query_wav": None,
                     "query_duration_s": None, "response_speaker": "f2", "response_wav": path,
                     "response_duration_s": seconds, "response_emotion": emotion})
    run.manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    neutral = P.voice_from_wav(*load_audio(run.root / "data/wavs/1.wav"))
    assert torch.allclose(P.run_voice(run, "f2"), neutral)  # not the longer, angry one


def test_playback_stalls_count_the_silence_while_a_late_piece_is_awaited():
    # pieces of 1 s each, ready at 0.5, 1.0, 3.0 (due at 2.5: 0.5 s late), 4.0 (due at 4.0 after the pause: on time)
    assert P.playback_stalls([(0.5, 0.0, 1.0), (1.0, 1.0, 1.0), (3.0, 2.0, 1.0), (4.0, 3.0, 1.0)]) == pytest.approx(0.5)
    assert P.playback_stalls([(0.2, 0.0, 1.0), (0.4, 1.0, 1.0)]) == 0.0  # faster than real time: no break
    assert P.playback_stalls([(0.3, 0.0, 0.1), (1.3, 0.1, 5.0)]) == pytest.approx(0.9)  # a short first piece
    assert P.playback_stalls([]) == 0.0


def test_fit_plan_reader_uses_the_training_replies_targets_and_names_notebook_03(tmp_path):
    from emo_lib.paths import RunDir
    from emo_lib.pipeline import fit_plan_reader
    from emo_lib.store import write_frame_store

    run = RunDir("plans", root=tmp_path).make()
    with pytest.raises(FileNotFoundError, match="03"):
        fit_plan_reader(run, [])
    rng = np.random.default_rng(0)
    centres = {"neutral": np.zeros(4), "sadness": np.full(4, 3.0)}
    rows = [{"pair_id": f"p{i}", "split": "train" if i < 20 else "test", "response_emotion": list(centres)[i % 2]}
            for i in range(26)]
    write_frame_store(run.root / "features" / "trajectories.npy",
                      ((r["pair_id"], centres[r["response_emotion"]] + rng.normal(scale=0.3, size=(5, 4))) for r in rows))
    reader = fit_plan_reader(run, rows, seed=0)
    held = [r for r in rows if r["split"] == "test"]
    from emo_lib.store import FrameStore
    targets = FrameStore(run.root / "features" / "trajectories.npy")
    assert reader.predict([targets[r["pair_id"]] for r in held]) == [r["response_emotion"] for r in held]
