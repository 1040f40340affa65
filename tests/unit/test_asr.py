"""Whisper ASR: WER arithmetic, the CTranslate2 -> transformers conversion, offline errors."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import shutil
import struct
import subprocess

import numpy as np
import pytest

from emo_lib import asr
from emo_lib.asr import normalize_for_wer, word_error_rate
from emo_lib.whisper_convert import read_ct2_model

FOX = "The quick brown fox jumps over the lazy dog."
# A sentence that tiny.en transcribes word for word from espeak-ng's en-us voice (it hears the
# fox sentence as "...fox jump over the lazy nog", and so does CTranslate2 itself).
CUSHION = "The soft cushion broke the man's fall."


# --- word error rate ---------------------------------------------------------------------------
def test_wer_identical_is_zero():
    assert word_error_rate("the cat sat on the mat", "the cat sat on the mat") == 0.0


def test_wer_substitution_insertion_deletion():
    assert word_error_rate("the cat sat", "the bat sat") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "the cat sat down") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "the sat") == pytest.approx(1 / 3)
    assert word_error_rate("a b", "c d e f") == pytest.approx(2.0)  # can exceed 1


def test_wer_ignores_case_and_punctuation():
    assert normalize_for_wer("I'm here, Bob!  Well-known\u2019s   end.") == ["im", "here", "bob", "well", "knowns", "end"]
    assert word_error_rate("I'm here, Bob!", "im HERE bob") == 0.0


def test_wer_empty_reference():
    assert word_error_rate("", "") == 0.0
    assert word_error_rate(" ... ", "") == 0.0
    assert word_error_rate("", "hello") == 1.0


# --- model.bin reader on a hand-written file ---------------------------------------------------
def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def test_read_ct2_model_decodes_dtypes_and_aliases(tmp_path):
    f16 = np.arange(6, dtype=np.float16).reshape(2, 3)
    i8 = np.array([-3, 5], dtype=np.int8)
    bf16 = np.array([1.5, -2.0], dtype=np.float32)  # exactly representable in bfloat16
    bf16_bits = (bf16.view(np.uint32) >> 16).astype("<u2")
    body = struct.pack("<I", 6) + _ct2_string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", 3)
    for name, arr, type_id, raw in [
        ("a/weight", f16, 4, f16.tobytes()),
        ("b", i8, 1, i8.tobytes()),
        ("c", bf16, 5, bf16_bits.tobytes()),
    ]:
        body += _ct2_string(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
        body += struct.pack("<BI", type_id, len(raw)) + raw
    body += struct.pack("<I", 1) + _ct2_string("d/weight") + _ct2_string("a/weight")
    (tmp_path / "model.bin").write_bytes(body)

    name, variables, aliases = read_ct2_model(tmp_path)
    assert name == "WhisperSpec" and aliases == {"d/weight": "a/weight"}
    assert variables["a/weight"].dtype == np.float16 and np.array_equal(variables["a/weight"], f16)
    assert variables["b"].dtype == np.int8 and np.array_equal(variables["b"], i8)
    assert np.array_equal(variables["c"], bf16)


# --- the packaged model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """Convert the packaged tiny.en once into a private cache, as load_whisper does."""
    cache = tmp_path_factory.mktemp("emo-kit-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("EMO_KIT_CACHE", str(cache))
    try:
        model, processor = asr.load_whisper()
        yield model, processor, cache / "whisper-tiny.en"
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """{text: (signal, sample_rate)} synthesized by espeak-ng."""
    import soundfile as sf

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): it synthesizes the test speech")
    folder = tmp_path_factory.mktemp("speech")
    out = {}
    for i, text in enumerate([FOX, CUSHION]):
        path = folder / f"{i}.wav"
        subprocess.run([espeak, "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
        wav, sr = sf.read(path, dtype="float32")
        out[text] = (wav, sr)
    return out


@pytest.fixture(scope="module")
def ct2_whisper():
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (dev extra) is the reference runtime")
    return ctranslate2, ctranslate2.models.Whisper(
        str(asr._packaged_ct2_dir()), device="cpu", compute_type="float32", intra_threads=2
    )


def _features(processor, wav, sr):
    (wav16,) = asr._to_16k([wav], sr)
    feats = processor.feature_extractor([wav16], sampling_rate=16000, return_tensors="np").input_features
    return np.ascontiguousarray(feats, dtype=np.float32)


def test_conversion_writes_a_reusable_folder(whisper, monkeypatch):
    _, _, folder = whisper
    assert (folder / "model.safetensors").exists() and (folder / "generation_config.json").exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setenv("EMO_KIT_CACHE", str(folder.parent))
    monkeypatch.setattr("emo_lib.whisper_convert.convert_ct2_whisper", no_conversion)
    model, _ = asr.load_whisper()
    assert model.config.vocab_size == 51864 and model.generation_config.no_timestamps_token_id == 50362


def test_encoder_matches_ctranslate2(whisper, speech, ct2_whisper):
    import torch

    model, processor, _ = whisper
    ctranslate2, reference = ct2_whisper
    feats = _features(processor, *speech[FOX])
    with torch.inference_mode():
        ours = model.model.encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(feats), to_cpu=True))
    assert ours.shape == theirs.shape == (1, 1500, 384)
    assert float(np.abs(ours - theirs).max()) <= 1e-3


def test_transcripts_match_ctranslate2_and_text(whisper, speech, ct2_whisper):
    model, processor, _ = whisper
    ctranslate2, reference = ct2_whisper
    texts = [FOX, CUSHION]
    sr = speech[FOX][1]
    ours = asr.transcribe(model, processor, [speech[t][0] for t in texts], sr=sr, batch_size=2)

    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    for text, hyp in zip(texts, ours):
        feats = ctranslate2.StorageView.from_array(_features(processor, *speech[text]))
        ids = reference.generate(feats, [prompt], beam_size=1)[0].sequences_ids[0]
        assert hyp == processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    assert normalize_for_wer(ours[1]) == normalize_for_wer(CUSHION)
    assert word_error_rate(FOX, ours[0]) <= 0.25  # tiny.en mishears espeak's "jumps" and "dog"


def test_offline_hub_id_names_the_packaged_model(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="packaged:whisper-tiny.en"):
        asr.load_whisper("definitely/not-a-real-model-id")


def test_fast_filter_recognizer_is_faster_and_as_accurate(whisper):
    """The data filter's CTranslate2 short-window engine against the standard 30 s window."""
    import time

    from emo_lib import corpus, tts

    model, processor, _ = whisper
    queries = corpus.load_queries(domains=["work", "pets"])[::9][:16]
    wavs = [tts.synthesize(q["text"], speaker, tts.sample_prosody(q["emotion"], np.random.default_rng(i)))
            for i, (q, speaker) in enumerate(zip(queries, list(tts.SPEAKERS) * 2))]
    texts = [q["text"] for q in queries]
    fast = asr.FastWhisper(processor)
    started = time.perf_counter()
    quick = fast.transcribe(wavs, sr=tts.SAMPLE_RATE, batch_size=8)
    fast_s = time.perf_counter() - started
    started = time.perf_counter()
    slow = asr.transcribe(model, processor, wavs, sr=tts.SAMPLE_RATE, batch_size=8)
    slow_s = time.perf_counter() - started
    wer = lambda hyps: float(np.mean([min(word_error_rate(t, h), 1.0) for t, h in zip(texts, hyps)]))  # noqa: E731
    assert wer(quick) <= wer(slow) + 0.05, (wer(quick), wer(slow))
    assert fast_s < slow_s / 2, (fast_s, slow_s)
