"""Encoders and adapters: frame arithmetic, masks, checkpoints, Whisper frames on real speech."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from emo_lib import encoders as E
from emo_lib.paths import MissingInputError, write_jsonl_atomic
from emo_lib.train import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint

DURATIONS_S = [0.1, 0.25, 0.5, 1.0, 2.34, 7.77, 12.5, 30.0]


def tiny_encoder(**overrides) -> E.EmotionEncoder:
    torch.manual_seed(0)
    config = dict(emotion_dim=16, layers=2, kernel_size=3, dropout=0.0)
    config.update(overrides)
    return E.EmotionEncoder(E.EmotionEncoderConfig(**config)).eval()


def noise(n_samples: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n_samples)).astype(np.float32)


# --- frame arithmetic and adapters -------------------------------------------------------------
def test_frame_lengths_follow_the_documented_formulas():
    for n in [1, 159, 160, 161, 319, 320, 321, 16000, 48123]:
        assert E.frames_100hz(n) == math.ceil(n / 160)
        assert E.frames_50hz(n) == math.ceil(n / 320) == E.stem_length(E.frames_100hz(n))
    assert [E.downsampled_length(t) for t in [0, 1, 4, 5, 6, 10, 11, 1500]] == [0, 1, 1, 1, 2, 2, 3, 300]


@pytest.mark.parametrize("seconds", DURATIONS_S)
def test_adapter_output_length_for_each_duration(seconds):
    t50 = math.ceil(seconds * 50)
    adapter = E.DownsampleAdapter(8, 4)
    out, mask = adapter(torch.randn(1, t50, 8), torch.ones(1, t50, dtype=torch.bool))
    assert out.shape == (1, math.ceil(t50 / 5), 4)
    assert mask.shape == (1, math.ceil(t50 / 5)) and bool(mask.all())


def test_adapter_in_a_padded_batch_matches_each_item_alone():
    torch.manual_seed(0)
    adapter = E.DownsampleAdapter(8, 4)
    lengths = [math.ceil(s * 50) for s in DURATIONS_S]
    items = [torch.randn(t, 8) for t in lengths]
    batch, mask = E.pad_frames([x.numpy() for x in items])
    out, out_mask = adapter(batch, mask)
    assert out.shape[1] == E.downsampled_length(max(lengths))
    for i, (x, t) in enumerate(zip(items, lengths)):
        alone, _ = adapter(x[None], torch.ones(1, t, dtype=torch.bool))
        valid = E.downsampled_length(t)
        assert int(out_mask[i].sum()) == valid
        torch.testing.assert_close(out[i, :valid], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.all(out[i, valid:] == 0)  # padded output frames are zeroed


def test_mask_downsampling_marks_a_window_valid_if_any_frame_is():
    mask = E.lengths_to_mask(torch.tensor([1, 5, 6, 12]), 12)
    assert E.downsample_mask(mask).tolist() == [
        [True, False, False], [True, False, False], [True, True, False], [True, True, True]]
    sparse = torch.zeros(1, 7, dtype=torch.bool)
    sparse[0, 4] = True  # the last frame of the first window only
    assert E.downsample_mask(sparse).tolist() == [[True, False]]


def test_projector_output_shape_and_mask():
    projector = E.SpeechProjector(semantic_dim=384, emotion_dim=16, llm_dim=576)
    mask = E.lengths_to_mask(torch.tensor([77, 23]), 77)
    emb, out_mask = projector(torch.randn(2, 77, 384), torch.randn(2, 77, 16), mask)
    assert emb.shape == (2, 16, 576)
    assert out_mask.sum(1).tolist() == [16, 5]
    with pytest.raises(ValueError, match="share"):
        projector(torch.randn(2, 77, 384), torch.randn(2, 76, 16), mask)


# --- emotion encoder ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_samples", [1, 200, 320, 321, 5000, 16000, 48123])
def test_emotion_encoder_gives_whispers_frame_count(n_samples):
    features = E.emotion_input_features(noise(n_samples))
    assert features.shape == (math.ceil(n_samples / 160), E.INPUT_DIM)
    assert np.all(np.isfinite(features))
    [frames] = E.emotion_frames(tiny_encoder(), [noise(n_samples)])
    assert frames.shape == (math.ceil(n_samples / 320), 16)  # Whisper's 50 Hz count


def test_emotion_frames_do_not_depend_on_batch_padding():
    model = tiny_encoder()
    wavs = [noise(n, seed=n) for n in (3000, 16000, 7777)]
    together = E.emotion_frames(model, wavs)
    for wav, frames in zip(wavs, together):
        np.testing.assert_allclose(E.emotion_frames(model, [wav])[0], frames, atol=1e-5)


def test_pitch_features_of_a_200_hz_tone():
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    features = E.emotion_input_features(tone)
    middle = features[20:-20]
    log_f0, relative, voicing = (middle[:, E.FEATURE_NAMES.index(k)] for k in
                                 ("log_f0_semitones", "relative_f0_semitones", "voicing"))
    assert np.all(voicing == 1)
    np.testing.assert_allclose(log_f0, 12.0, atol=0.2)  # 200 Hz is one octave above 100 Hz
    np.testing.assert_allclose(relative, 0.0, atol=0.2)


def test_predict_emotions_returns_known_labels_and_probabilities():
    labels, confidences = E.predict_emotions(tiny_encoder(), [noise(8000), noise(20000, 1)])
    assert all(label in E.EMOTIONS for label in labels)
    assert all(1 / 7 <= c <= 1 for c in confidences)


def test_speaker_erasure_leaves_no_linear_speaker_information():
    rng = np.random.default_rng(0)
    speakers = np.repeat(["m1", "f1", "m2"], 60)
    offsets = {"m1": rng.normal(size=16) * 3, "f1": rng.normal(size=16) * 3, "m2": rng.normal(size=16) * 3}
    pooled = rng.normal(size=(180, 16)) + np.stack([offsets[s] for s in speakers])
    model = tiny_encoder(erase_rank=2)
    assert model.fit_speaker_erasure(pooled, list(speakers)) == 2
    frames = torch.as_tensor(pooled, dtype=torch.float32)[:, None, :]  # one frame per utterance
    erased = model.erase_speaker(frames, torch.ones(180, 1, dtype=torch.bool))[:, 0].double().numpy()
    means = np.stack([erased[speakers == s].mean(0) for s in ["m1", "f1", "m2"]])
    np.testing.assert_allclose(means, means[[0, 0, 0]], atol=1e-4)  # every speaker has the same mean
    from sklearn.linear_model import LogisticRegression

    assert LogisticRegression(max_iter=2000).fit(pooled, speakers).score(pooled, speakers) > 0.95
    assert LogisticRegression(max_iter=2000).fit(erased, speakers).score(erased, speakers) < 0.6
    # erasure is affine and per frame, so it commutes with mean pooling
    two = torch.as_tensor(pooled[:2], dtype=torch.float32)[None]
    pooled_after = model.erase_speaker(two, torch.ones(1, 2, dtype=torch.bool)).mean(1)
    torch.testing.assert_close(pooled_after[0], torch.as_tensor(erased[:2].mean(0), dtype=torch.float32))


def test_encode_wav_files_gives_frames_and_predictions_of_each_file(tmp_path):
    model = tiny_encoder()
    paths = []
    for i, n in enumerate([4000, 9000]):
        paths.append(tmp_path / f"{i}.wav")
        sf.write(paths[-1], noise(n, seed=i), 16000)
    frames, labels, confidences = E.encode_wav_files(model, paths)
    wavs = [noise(4000, seed=0), noise(9000, seed=1)]
    assert [len(f) for f in frames] == [E.frames_50hz(4000), E.frames_50hz(9000)]
    expected_labels, expected_confidences = E.predict_emotions(model, wavs)
    assert labels == expected_labels
    np.testing.assert_allclose(confidences, expected_confidences, atol=1e-2)  # float16 cached features
    for a, b in zip(frames, E.emotion_frames(model, wavs)):
        np.testing.assert_allclose(a, b, atol=0.05)


def test_input_features_in_worker_processes_equal_serial_ones(tmp_path):
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.wav")
        sf.write(paths[-1], noise(3000 + 500 * i, seed=i), 16000)
    E.clear_feature_cache()
    parallel = E.cached_input_features(paths, workers=2)
    E.clear_feature_cache()
    serial = E.cached_input_features(paths)
    for a, b in zip(parallel, serial):
        np.testing.assert_array_equal(a, b)
    assert E.cached_input_features(paths[:2])[1] is serial[1]  # memoised


def _toy_run(root):
    """A run directory whose 'emotions' are tone pitches and whose 'speakers' are loudness levels."""
    rows, sr = [], 22050
    t = np.arange(int(0.6 * sr)) / sr
    for i in range(36):
        speaker = ["m1", "f1", "m5"][i % 3]
        emotion = ["sadness", "happiness"][(i // 3) % 2]
        pitch = 110.0 if emotion == "sadness" else 260.0
        level = {"m1": 0.2, "f1": 0.5, "m5": 0.35}[speaker]
        for role in ("query", "response"):
            wav = level * np.sin(2 * np.pi * pitch * (1 + 0.01 * (i % 5)) * t)
            sf.write(root / f"{i}_{role}.wav", wav.astype(np.float32), sr)
        rows.append({"pair_id": f"p{i}", "kept": True, "split": "test" if speaker == "m5" else ("val" if i % 7 == 0 else "train"),
                     "query_wav": f"{i}_query.wav", "response_wav": f"{i}_response.wav",
                     "query_emotion": emotion, "response_emotion": emotion,
                     "query_speaker": speaker, "response_speaker": speaker})
    rows.append({**rows[0], "pair_id": "dropped", "kept": False, "query_emotion": "anger"})
    write_jsonl_atomic(root / "manifest.jsonl", rows)
    return rows


def test_training_evaluation_and_probes_run_end_to_end(tmp_path):
    rows = _toy_run(tmp_path)
    cfg = {"emotion_dim": 16, "layers": 1, "epochs": 3, "batch_size": 8, "lr": 5e-3, "speaker_adversary": 0.1}
    model, history = E.train_emotion_encoder(rows, tmp_path, cfg, progress=False)
    assert len(history["train_loss"]) == len(history["val_accuracy"]) == 3
    assert history["train_utterances"] == 2 * sum(r["kept"] and r["split"] == "train" for r in rows)
    assert history["erased_rank"] == 1  # two training speakers
    report = E.evaluate_emotion_encoder(model, rows, tmp_path)
    assert report["speakers"] == ["m5"] and report["query_accuracy"] == 1.0
    assert np.array(report["query_confusion"]).sum() == report["n_queries"] == 12
    probes = E.probe_emotion_vs_speaker(model, rows, tmp_path)
    # fitted on split train, scored on split val: utterances the encoder and the erasure never fitted
    n_val = 2 * sum(r["kept"] and r["split"] == "val" for r in rows)
    assert probes["protocol"] == "train->val" and probes["n_test"] == n_val > 0
    assert probes["n_train"] == history["train_utterances"]
    assert probes["speaker_chance_uniform"] == 0.5 and probes["erased_rank"] == 1
    for stage in ("", "_before_erasure"):
        for kind in ("", "mlp_"):
            for target in ("emotion", "speaker"):
                assert 0 <= probes[f"{target}_{kind}probe_accuracy{stage}"] <= 1
    # without a val split: the stratified fallback, and the report says so
    no_val = [dict(r, split="train") if r["split"] == "val" else r for r in rows]
    fallback = E.probe_emotion_vs_speaker(model, no_val, tmp_path, nonlinear=False)
    assert fallback["protocol"].startswith("stratified") and fallback["n_train"] + fallback["n_test"] == 48
    assert "emotion_mlp_probe_accuracy" not in fallback
    # same seed, same model
    again, _ = E.train_emotion_encoder(rows, tmp_path, cfg, progress=False)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_unknown_training_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown emotion-encoder training keys"):
        E.train_emotion_encoder([], tmp_path, {"epochz": 3})


# --- checkpoints -------------------------------------------------------------------------------
def test_emotion_encoder_checkpoint_round_trip(tmp_path):
    model = tiny_encoder(erase_rank=3)
    model.set_feature_stats(np.full(E.INPUT_DIM, 0.5), np.full(E.INPUT_DIM, 2.0))
    model.fit_speaker_erasure(np.random.default_rng(0).normal(size=(40, 16)), ["a", "b", "c", "d"] * 10)
    path = E.save_emotion_encoder(tmp_path / "emotion.pt", model, history={"val_accuracy": [0.5]})
    loaded = E.load_emotion_encoder(path, expected_dim=16)
    wav = noise(9000)
    np.testing.assert_array_equal(E.emotion_frames(loaded, [wav])[0], E.emotion_frames(model, [wav])[0])
    assert loaded.config == model.config
    assert load_checkpoint(path, "x")["history"] == {"val_accuracy": [0.5]}


def test_width_mismatch_names_both_widths(tmp_path):
    path = E.save_emotion_encoder(tmp_path / "emotion.pt", tiny_encoder())
    with pytest.raises(CheckpointError, match=r"width 16.*width 256"):
        E.load_emotion_encoder(path, expected_dim=256)


def test_missing_checkpoint_names_the_notebook(tmp_path):
    with pytest.raises(MissingInputError, match="02_features.ipynb"):
        E.load_emotion_encoder(tmp_path / "nowhere.pt")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = E.save_emotion_encoder(tmp_path / "emotion.pt", tiny_encoder())
    path.write_bytes(path.read_bytes()[:200])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="corrupt.*02_features.ipynb"):
        E.load_emotion_encoder(path)
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "other.pt", "notebooks/03_stage1.ipynb")


def test_failed_save_leaves_neither_file_nor_temporary(tmp_path):
    with pytest.raises(Exception):
        save_checkpoint(tmp_path / "model.pt", {"weights": torch.ones(2), "bad": lambda: None})
    assert list(tmp_path.iterdir()) == []
    save_checkpoint(tmp_path / "model.pt", {"weights": torch.ones(2)})
    with pytest.raises(Exception):  # a failed overwrite keeps the old file
        save_checkpoint(tmp_path / "model.pt", {"bad": lambda: None})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    torch.testing.assert_close(load_checkpoint(tmp_path / "model.pt", "x")["weights"], torch.ones(2))


def test_latest_checkpoint_prefers_latest_pt_then_newest_mtime(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    for name, mtime in [("step_1000.pt", 1_000), ("step_900.pt", 2_000)]:
        save_checkpoint(tmp_path / name, {"step": name})
        os.utime(tmp_path / name, (mtime, mtime))
    assert latest_checkpoint(tmp_path).name == "step_900.pt"  # newest file, not the biggest number
    save_checkpoint(tmp_path / "latest.pt", {"step": "latest"})
    os.utime(tmp_path / "latest.pt", (0, 0))
    assert latest_checkpoint(tmp_path).name == "latest.pt"


# --- Whisper frames on real speech -------------------------------------------------------------
@pytest.fixture(scope="module")
def sentence_16k():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): it synthesizes the test speech")
    from emo_lib import audio, tts

    wav = tts.synthesize("The soft cushion broke the man's fall.", "m2",
                         tts.sample_prosody("neutral", np.random.default_rng(0)))
    return audio.resample(wav, tts.SAMPLE_RATE, 16000)


@pytest.fixture(scope="module")
def whisper():
    from emo_lib.asr import load_whisper

    return load_whisper()


def test_whisper_frames_are_cut_to_the_audio_and_close_to_the_30s_window(whisper, sentence_16k):
    model, processor = whisper
    wavs = [sentence_16k, sentence_16k[:12345]]
    fitted = E.whisper_encoder_frames(model, processor, wavs)
    full = E.whisper_encoder_frames(model.get_encoder(), processor, wavs, full_window=True)
    # The fitted window (audio + 1 s) changes the frames a little: less so for a whole
    # sentence ending in silence than for 0.77 s cut off mid-word.
    for wav, a, b, least_median in zip(wavs, fitted, full, [0.95, 0.85]):
        assert a.shape == b.shape == (math.ceil(len(wav) / 320), 384)
        assert a.dtype == np.float32
        cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert np.median(cosine) > least_median
    # the emotion encoder's frames line up one to one with Whisper's
    assert [len(f) for f in E.emotion_frames(tiny_encoder(), wavs)] == [len(f) for f in fitted]


def test_own_encoder_forward_equals_transformers_on_the_30s_window(whisper, sentence_16k):
    model, processor = whisper
    encoder = model.get_encoder()
    mel = processor.feature_extractor([sentence_16k], sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        torch.testing.assert_close(E._run_whisper_encoder(encoder, mel), encoder(mel).last_hidden_state)


def test_a_plan_is_read_with_the_encoders_own_head():
    from emo_lib.corpus import EMOTIONS

    torch.manual_seed(0)
    model = E.EmotionEncoder(E.EmotionEncoderConfig(emotion_dim=16, layers=1)).eval()
    vectors = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
    probs = E.plan_emotion_probabilities(model, vectors, window=3)
    assert probs.shape == (6, len(EMOTIONS))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    mask = torch.ones(1, 3, dtype=torch.bool)
    expected = torch.softmax(model.utterance_logits(torch.as_tensor(vectors[1:4])[None], mask), -1)[0].detach().numpy()
    np.testing.assert_allclose(probs[2], expected, atol=1e-5)  # token 2 reads tokens 1..3
    assert E.plan_emotion_probabilities(model, vectors[:0]).shape == (0, len(EMOTIONS))
    # the whole plan, pooled: the head's verdict over all six tokens
    whole = model.utterance_logits(torch.as_tensor(vectors)[None], torch.ones(1, 6, dtype=torch.bool))[0]
    assert E.plan_emotion(model, vectors) == EMOTIONS[int(whole.argmax())]
    assert E.plan_emotion(model, vectors[:0]) == ""
    with pytest.raises(ValueError, match="a plan is"):
        E.plan_emotion(model, vectors[0])


def test_the_plan_reader_learns_plans_of_separate_emotions_and_says_so_for_bad_input():
    rng = np.random.default_rng(0)
    centres = {"neutral": rng.normal(size=8), "sadness": rng.normal(size=8), "disgust": rng.normal(size=8)}

    def plans(n):
        names = [list(centres)[i % 3] for i in range(n)]
        return [centres[e] + rng.normal(scale=0.8, size=(int(rng.integers(3, 12)), 8)) for e in names], names

    fit_plans, fit_names = plans(90)
    reader = E.PlanReader(seed=0).fit(fit_plans, fit_names)
    held_plans, held_names = plans(60)
    accuracy = np.mean([a == b for a, b in zip(reader.predict(held_plans), held_names)])
    assert accuracy > 0.9  # chance is 1/3
    assert reader.labels == sorted(centres)
    assert reader.predict([np.zeros((0, 8)), held_plans[0]])[0] == ""
    probs = reader.predict_proba(held_plans[:4])
    assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1.0)
    assert [reader.labels[i] for i in probs.argmax(1)] == reader.predict(held_plans[:4])
    per_token = reader.token_probabilities(held_plans[0], window=3)
    assert per_token.shape == (len(held_plans[0]), 3)
    np.testing.assert_allclose(per_token[1], reader.predict_proba([held_plans[0][0:3]])[0])  # token 1 reads 0..2
    assert reader.token_probabilities(np.zeros((0, 8))).shape == (0, 3)
    assert E.PlanReader.features([np.ones((2, 4))]).shape == (1, 8)
    with pytest.raises(RuntimeError, match="not fitted"):
        E.PlanReader().predict(held_plans)
    with pytest.raises(ValueError, match="two emotions"):
        E.PlanReader().fit(fit_plans[:3], ["neutral"] * 3)
    with pytest.raises(ValueError, match="different widths"):
        E.PlanReader.features([np.ones((2, 4)), np.ones((2, 5))])
    with pytest.raises(ValueError, match="plans but"):
        E.PlanReader().fit(fit_plans, fit_names[:-1])
