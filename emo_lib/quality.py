"""A MOS stand-in: speech quality predicted by a packaged, offline model (notebook 08).

**This is not UTMOS** (the paper's naturalness MOS): no UTMOS weights exist offline. The kit uses a
non-intrusive quality predictor whose weights ship inside a PyPI wheel instead:

- ``"distillmos"`` (default, installed by ``make setup`` from requirements-weights.txt):
  DistillMOS (``distillmos==0.9.1``, MIT), a small convolution + Transformer model (4.1 M parameters)
  distilled from an XLS-R based speech-quality model; it predicts one overall MOS in [1, 5] for
  16 kHz speech. Its weights (``distillmos/weights/distill_mos_v7.pt``, 17 MB) are inside the wheel;
  its code needs only torch, torchaudio, numpy and the model classes of ``xls-r-sqa`` (plain torch).
- ``"dnsmos"`` (optional, not installed by the kit): DNSMOS P.835 from ``speechmos==0.0.1.1`` (MIT),
  the DNS Challenge's ONNX models (inside that wheel). The score returned is OVRL, the P.835 overall
  quality; the package also computes SIG (speech signal), BAK (background noise) and a P.808 MOS.
  It needs ``onnxruntime`` and ``librosa``: ``pip install --no-deps speechmos==0.0.1.1`` then
  ``pip install onnxruntime librosa``.

What the scores mean here. Both models were trained on ratings of real human speech, mostly with
noise, reverberation, codecs or enhancement artefacts. The kit's voices are synthetic (espeak-ng,
then the kit's own token2mel + HiFi-GAN), far outside that training domain: a clean espeak-ng
recording can score low because it sounds robotic, not because it is noisy. Use the numbers to
*compare systems on the same sentences* (recorded vs resynthesized, one ablation arm vs another),
never as an absolute naturalness score and never against the paper's UTMOS values.

Speed (measured on this project's 2-core x86-64 machine, 1 thread, while another job shared it):
DistillMOS takes about 0.6 s per clip up to 7.68 s long (its analysis window; 0.15 s per second of
audio for a 4 s reply, 0.08 s at 7.68 s); longer clips are scored in windows 1 s apart, 0.5 to 0.7 s
per second of audio (15 to 30 s clips). DNSMOS (optional) needs about 0.1 s per 9 s window after a
first call that compiles librosa's kernels (seconds).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .audio import AudioError, prepare_audio

PREDICTORS = ("distillmos", "dnsmos")
MIN_SECONDS = 0.5  # shorter clips are refused: a quality judgement needs some speech
INSTALL_HINT = {
    "distillmos": "run `make setup` (it installs requirements-weights.txt), or "
                  "`pip install --no-deps distillmos==0.9.1 xls-r-sqa==0.1.0`",
    "dnsmos": "`pip install --no-deps speechmos==0.0.1.1 && pip install onnxruntime librosa` "
              "(optional; the kit's default predictor is 'distillmos')",
}


@dataclass
class MosPredictor:
    """A loaded quality model: ``score(wav16k) -> float`` on mono float32 audio at ``sample_rate``.

    ``window_s`` is the model's analysis window: shorter clips are padded by the model's own rule
    (``padding``), longer ones scored in overlapping windows and averaged.
    """

    name: str
    sample_rate: int
    window_s: float
    padding: str
    score: Callable[[np.ndarray], float] = field(repr=False)
    model: Any = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _load_distillmos(device: str) -> MosPredictor:
    """DistillMOS with its packaged weights, loaded quietly (the package's own loader prints)."""
    import os

    import torch

    try:
        from distillmos import sqa
    except ImportError as err:
        raise ImportError(f"DistillMOS is not installed ({err}); {INSTALL_HINT['distillmos']}") from err
    weights = os.path.join(os.path.dirname(sqa.__file__), "weights", "distill_mos_v7.pt")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"DistillMOS weights are missing at {weights}; reinstall: {INSTALL_HINT['distillmos']}")
    model = sqa.ConvTransformerSQAModel(load_weights=False)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval().to(device)

    @torch.inference_mode()
    def score(wav16k: np.ndarray) -> float:
        x = torch.as_tensor(np.ascontiguousarray(wav16k, dtype=np.float32), device=device)[None]
        return float(model(x).reshape(-1)[0])

    return MosPredictor("distillmos", 16000, sqa.SEQ_LEN / 16000, "zero-padded to the 7.68 s window (DistillMOS's rule)",
                        score, model)


def _load_dnsmos() -> MosPredictor:
    """DNSMOS P.835 (OVRL) through the speechmos package's own ONNX sessions."""
    import os

    try:
        from speechmos import dnsmos
    except ImportError as err:
        raise ImportError(f"DNSMOS needs speechmos, onnxruntime and librosa ({err}); {INSTALL_HINT['dnsmos']}") from err
    folder = os.path.dirname(dnsmos.__file__)
    model = dnsmos.DNSMOS(os.path.join(folder, "dnsmos_models", "sig_bak_ovr.onnx"),
                          os.path.join(folder, "dnsmos_models", "model_v8.onnx"))

    def score(wav16k: np.ndarray) -> float:
        return float(model(np.asarray(wav16k, dtype=np.float32), 16000, False)["ovrl_mos"])

    return MosPredictor("dnsmos", 16000, dnsmos.INPUT_LENGTH, "repeated to the 9.01 s window (DNSMOS's rule)",
                        score, model)


def load_mos_predictor(name: str = "distillmos", device: str = "cpu") -> MosPredictor:
    """Load a packaged MOS stand-in: ``"distillmos"`` (the kit's default) or ``"dnsmos"`` (optional).

    Offline: the weights come from the installed wheel. ``device`` applies to DistillMOS (a torch
    model); DNSMOS runs on onnxruntime's CPU provider. An unknown name raises ValueError listing the
    valid ones; a predictor whose package is missing raises ImportError with the install command.
    """
    if name not in PREDICTORS:
        raise ValueError(f"unknown MOS predictor {name!r}; choose one of {', '.join(PREDICTORS)}")
    return _load_distillmos(device) if name == "distillmos" else _load_dnsmos()


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def prepare_clip(wav: np.ndarray, sr: int, predictor: MosPredictor, index: int) -> np.ndarray:
    """One clip ready for the predictor: mono float32 at its rate, peak at most 1.

    Empty, silent (peak < 1e-3), non-finite or shorter-than-``MIN_SECONDS`` audio raises a
    ValueError naming ``wavs[index]``. Louder-than-full-scale float audio is scaled to peak 1
    (DNSMOS refuses samples outside [-1, 1]; DistillMOS normalizes the peak itself).
    """
    name = f"wavs[{index}]"
    try:
        clip, _ = prepare_audio(wav, sr, target_sr=predictor.sample_rate, name=name)
    except AudioError as err:
        raise ValueError(f"cannot score {err}") from err
    seconds = len(clip) / predictor.sample_rate
    if seconds < MIN_SECONDS:
        raise ValueError(f"cannot score {name}: it lasts {seconds:.2f} s, less than the {MIN_SECONDS} s a quality "
                         f"judgement needs (clips up to the {predictor.window_s:.2f} s window are "
                         f"{predictor.padding}); score a longer clip")
    peak = float(np.abs(clip).max())
    return clip / peak if peak > 1.0 else clip


def predict_mos(predictor: MosPredictor, wavs: list[np.ndarray], sr: int) -> np.ndarray:
    """Predicted MOS (about 1 to 5, higher is better) of each clip: a float64 array of shape (len(wavs),).

    ``wavs``: 1-D float (or int PCM) arrays, all at sample rate ``sr`` (resampled to the predictor's
    16 kHz with ``audio.resample``; stereo is averaged to mono). Clips shorter than the model's
    window are padded by the model's own rule (``predictor.padding``); clips under ``MIN_SECONDS``
    and empty, silent or non-finite clips raise ValueError naming their index. Every clip is
    checked before any is scored. Not UTMOS: see the module docstring.
    """
    if isinstance(wavs, np.ndarray) and wavs.ndim == 1:
        raise ValueError("wavs must be a list of clips; wrap a single clip as [wav]")
    if len(wavs) == 0:
        return np.zeros(0, dtype=np.float64)
    clips = [prepare_clip(w, sr, predictor, i) for i, w in enumerate(wavs)]
    return np.array([predictor.score(c) for c in clips], dtype=np.float64)
