"""Discrete speech tokens: content units plus prosody tokens, all at 25 Hz.

The stage-2 decoder does not predict audio directly: it predicts, for every 40 ms frame, three
small integers, and token2wav turns them back into sound.

1. **A content unit** (one of a few hundred): the nearest k-means centroid of the Whisper encoder
   frame. Why does that carry *what* is said more than *who* says it? Whisper's encoder was trained
   to predict transcripts of 680k hours from countless speakers, so what survives to its last layer
   is what predicts the text (phones, words) and it is pushed to ignore what does not (timbre,
   channel, loudness). Quantising to a few hundred centroids keeps only the coarse structure of that
   space (the centroids become phone-like states) and throws away the residual, where most of the
   remaining voice detail lives. It is the recipe of HuBERT units in GSLM (Lakhotia et al., 2021)
   and of CosyVoice's supervised semantic tokens (Du et al., 2024), which are also cut from an ASR
   encoder. Do not take the claim on trust: ``normalized_mutual_information`` measures how much the
   units say about the speaker and about the emotion.
2. **A pitch token**: the frame's F0, log-spaced into ``PITCH_BINS - 1`` voiced bins (0 = unvoiced).
3. **An energy token**: the frame's loudness in dBFS, uniform bins between -60 and -10 dB.

Why the two prosody streams? Content units discard F0 and loudness by design, yet those are exactly
where the emotion lives in this dataset: espeak-ng renders each emotion with a pitch level, a pitch
range, a rate and a volume (``emo_lib.tts``). Rate survives in the units (how long a unit repeats),
pitch and loudness do not. Adding them as separate, quantised tokens (as in Polyak et al., 2021,
"Speech resynthesis from discrete disentangled self-supervised representations") lets the decoder
express emotion and lets token2wav reproduce it. Pitch bins are log-spaced because pitch is heard
on a ratio scale (equal ratios = equal musical intervals); energy bins are uniform in dB because
loudness is heard roughly logarithmically.

**Frame rate.** Whisper frames come at 50 Hz (20 ms); the mean of each consecutive pair gives 25 Hz
(40 ms), still shorter than nearly every phone, and half as many frames for the decoder to predict.
Frame ``t`` of an utterance covers ``[t * 40 ms, (t + 1) * 40 ms)``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .audio import estimate_f0
from .train import CheckpointError, load_checkpoint, save_checkpoint

UNIT_HZ = 25  # speech-token frames per second (40 ms each)
FRAMES50_PER_UNIT = 2  # Whisper encoder frames (50 Hz) pooled into one unit frame
PRODUCER = "05_tokens.ipynb"  # the notebook that fits and saves the k-means units

# Prosody vocabularies. The sizes below are *vocabulary sizes* (what an embedding table needs).
PITCH_BINS = 33  # id 0 = unvoiced, ids 1..32 = voiced, log-spaced between PITCH_FMIN and PITCH_FMAX
PITCH_FMIN = 60.0  # Hz; lower voiced F0 goes to bin 1
PITCH_FMAX = 400.0  # Hz; higher voiced F0 goes to the top bin
ENERGY_BINS = 8  # uniform in dB between ENERGY_MIN_DB (and below: silence) and ENERGY_MAX_DB (and above)
ENERGY_MIN_DB = -60.0
ENERGY_MAX_DB = -10.0


class UnitError(ValueError):
    """Speech units, or inputs to them, that the kit cannot use (ids out of range, wrong shapes)."""


# --------------------------------------------------------------------------------------------
# 50 Hz -> 25 Hz
# --------------------------------------------------------------------------------------------


def pool_to_unit_rate(frames50: np.ndarray) -> np.ndarray:
    """(T50, D) Whisper frames -> (ceil(T50 / 2), D) unit-rate frames, the mean of each pair.

    An odd last frame is kept on its own (the mean of one frame), so no audio is dropped and the
    unit count of an utterance is always ``ceil(T50 / 2)``.
    """
    frames50 = np.asarray(frames50, dtype=np.float32)
    if frames50.ndim != 2:
        raise UnitError(f"expected frames of shape (T50, D), got shape {frames50.shape}")
    n50, dim = frames50.shape
    n_units = -(-n50 // FRAMES50_PER_UNIT)
    padded = np.zeros((n_units * FRAMES50_PER_UNIT, dim), dtype=np.float32)
    padded[:n50] = frames50
    counts = np.full(n_units, FRAMES50_PER_UNIT, dtype=np.float32)
    if n50 % FRAMES50_PER_UNIT:
        counts[-1] = n50 % FRAMES50_PER_UNIT
    sums = padded.reshape(n_units, FRAMES50_PER_UNIT, dim).sum(axis=1)
    return sums / counts[:, None]


# --------------------------------------------------------------------------------------------
# k-means content units
# --------------------------------------------------------------------------------------------


def _as_float_tensor(frames, name: str = "frames") -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(frames, dtype=np.float32)) if not torch.is_tensor(frames) else frames.float()
    if tensor.ndim != 2:
        raise UnitError(f"{name} must be 2-D (N, D), got shape {tuple(tensor.shape)}")
    return tensor


def _nearest(x: torch.Tensor, centroids: torch.Tensor, centroid_sq: torch.Tensor,
             chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid and the squared distance to it, for every row of ``x``.

    ``||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2``: for a chunk of rows the middle term is one matrix
    multiply (BLAS), far faster and smaller than forming all differences (B, K, D). The argmin does
    not need ``||x||^2``; it is added afterwards for the distance itself. Chunking bounds memory to
    ``chunk_size * K`` floats whatever the number of frames.
    """
    labels = torch.empty(len(x), dtype=torch.long, device=x.device)
    dist = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for start in range(0, len(x), chunk_size):
        xb = x[start : start + chunk_size]
        scores = torch.addmm(centroid_sq[None, :], xb, centroids.T, beta=1.0, alpha=-2.0)  # (B, K)
        best, idx = scores.min(dim=1)
        labels[start : start + len(xb)] = idx
        # float32 cancellation can make a distance a hair below zero
        dist[start : start + len(xb)] = (best + (xb * xb).sum(dim=1)).clamp_min_(0.0)
    return labels, dist


def _kmeans_plus_plus(x: torch.Tensor, n_units: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) on the rows of ``x``.

    The first centre is a uniformly random row; each next one is drawn with probability
    proportional to the squared distance to the nearest centre chosen so far. Spreading the
    seeds out like this avoids the bad local minima of uniform seeding (two seeds in one cluster,
    none in another) and costs one pass over ``x`` per centre, so it runs on a small sample.
    """
    n = len(x)
    x_sq = (x * x).sum(dim=1)
    centres = torch.empty(n_units, x.shape[1], dtype=x.dtype, device=x.device)

    def sq_distance_to(centre: torch.Tensor) -> torch.Tensor:  # one matrix-vector product
        return (x_sq - 2 * (x @ centre) + (centre * centre).sum()).clamp_min_(0.0)

    centres[0] = x[int(torch.randint(n, (1,), generator=generator))]
    min_sq = sq_distance_to(centres[0])
    for k in range(1, n_units):
        total = float(min_sq.sum())
        if total > 0:
            pick = int(torch.multinomial(min_sq.cpu() / total, 1, generator=generator))
        else:  # fewer distinct points than centres: any point will do
            pick = int(torch.randint(n, (1,), generator=generator))
        centres[k] = x[pick]
        torch.minimum(min_sq, sq_distance_to(centres[k]), out=min_sq)
    return centres


class KMeansUnits:
    """Content units: k-means over standardised Whisper frames, in torch, chunked.

    Fitting (``fit``):

    - a seeded subsample of at most ``max_samples`` frames is drawn (a few hundred frames per
      centroid already place it well; more mostly costs time);
    - every feature dimension is standardised (z-score): k-means uses Euclidean distance, so a few
      dimensions with a much larger scale than the others (common in Transformer activations) would
      otherwise decide every assignment alone. The mean and std are stored and reused by ``encode``;
    - k-means++ seeding on a smaller seeded sample, then Lloyd iterations: assign every frame to its
      nearest centroid, move each centroid to the mean of its frames. A centroid that lost all its
      frames is re-seeded at the frame currently worst served (largest distance to its centroid),
      which removes the largest single error;
    - ``inertia`` (sum of squared distances in the standardised space) is recorded at every
      assignment step: it can only go down, and its curve shows when more iterations stop helping.
      Iterations stop early when no frame changes its unit.

    Cost: one iteration is ``2 N K D`` flops (a matrix multiply); 100k frames x 512 units x 384 dims
    is ~40 GFLOP, about a second on a laptop core.
    """

    def __init__(self) -> None:
        self.centroids: torch.Tensor | None = None  # (K, D), in the standardised space
        self.mean: torch.Tensor | None = None  # (D,)
        self.std: torch.Tensor | None = None  # (D,)
        self.inertia: list[float] = []  # per Lloyd iteration, on the fitting sample
        self.info: dict = {}  # seed, sample sizes, iterations run

    # -- properties -----------------------------------------------------------------------------

    @property
    def fitted(self) -> bool:
        return self.centroids is not None

    @property
    def n_units(self) -> int:
        self._require_fitted()
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        self._require_fitted()
        return int(self.centroids.shape[1])

    def cluster_centers(self) -> np.ndarray:
        """(K, D) centroids in the original feature space (undo the standardisation), for plots."""
        self._require_fitted()
        return (self.centroids * self.std + self.mean).numpy()

    def _require_fitted(self) -> None:
        if self.centroids is None:
            raise UnitError("KMeansUnits is not fitted: call fit(frames, ...) or KMeansUnits.load(path) first")

    # -- fitting ----------------------------------------------------------------------------------

    def fit(
        self,
        frames,
        n_units: int = 256,
        iters: int = 20,
        seed: int = 0,
        max_samples: int | None = 100_000,
        progress: bool = False,
        init_samples: int | None = None,
        chunk_size: int = 16_384,
        device: str | torch.device = "cpu",
    ) -> "KMeansUnits":
        """Fit ``n_units`` centroids to ``frames`` (N, D) (numpy, memmap or tensor); returns ``self``.

        ``max_samples`` caps the frames used (a seeded random subset; None = all), ``init_samples``
        the k-means++ sample (default ``max(10_000, 20 * n_units)``). Same inputs and seed give the
        same units.
        """
        if n_units < 1 or iters < 1:
            raise UnitError(f"n_units and iters must be at least 1, got n_units={n_units}, iters={iters}")
        shape = tuple(np.shape(frames))
        if len(shape) != 2:
            raise UnitError(f"frames must be 2-D (N, D), got shape {shape}")
        n_total = shape[0]
        if n_total < n_units:
            raise UnitError(f"cannot fit {n_units} units to {n_total} frames: need at least one frame per unit")
        generator = torch.Generator().manual_seed(int(seed))

        # 1. a seeded subsample (sorted indices: cheap, sequential reads from a memmap)
        if max_samples is not None and n_total > max_samples:
            if max_samples < n_units:
                raise UnitError(f"max_samples={max_samples} is smaller than n_units={n_units}")
            index = torch.randperm(n_total, generator=generator)[:max_samples].sort().values.numpy()
            sample = frames[torch.as_tensor(index)] if torch.is_tensor(frames) else np.asarray(frames)[index]
        else:
            sample = frames
        x = _as_float_tensor(sample).to(device)
        if not torch.isfinite(x).all():
            raise UnitError("frames contain NaN or infinite values")

        # 2. standardise (a new tensor: the caller's frames are never modified)
        self.mean = x.mean(dim=0).cpu()
        self.std = x.std(dim=0).clamp_min(1e-6).cpu()
        x = (x - self.mean.to(device)) / self.std.to(device)

        # 3. k-means++ on a smaller sample
        n_init = min(len(x), init_samples or max(10_000, 20 * n_units))
        init_index = torch.randperm(len(x), generator=generator)[:n_init].to(device)
        centroids = _kmeans_plus_plus(x[init_index], n_units, generator)

        # 4. Lloyd iterations
        from tqdm.auto import tqdm

        self.inertia = []
        labels_before = None
        bar = tqdm(range(iters), desc=f"k-means ({n_units} units, {len(x)} frames)", disable=not progress)
        for _ in bar:
            labels, dist = _nearest(x, centroids, (centroids * centroids).sum(dim=1), chunk_size)
            self.inertia.append(float(dist.double().sum()))
            bar.set_postfix(inertia=f"{self.inertia[-1]:.4g}")
            if labels_before is not None and torch.equal(labels, labels_before):
                break  # converged: the centroids below would not move
            labels_before = labels
            counts = torch.bincount(labels, minlength=n_units)
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
            empty = torch.nonzero(~filled).flatten()
            if len(empty):  # re-seed empty clusters at the worst-served frames
                worst = torch.topk(dist, len(empty)).indices
                centroids[empty] = x[worst]
        bar.close()
        self.centroids = centroids.cpu()
        self.info = {"seed": int(seed), "n_frames": int(n_total), "n_fit": int(len(x)), "n_init": int(n_init),
                     "iterations": len(self.inertia)}
        return self

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, frames, chunk_size: int = 16_384, device: str | torch.device = "cpu") -> np.ndarray:
        """(T, D) frames (numpy, memmap or tensor) -> (T,) int64 unit ids: the nearest centroid.

        Frames are converted and standardised one chunk at a time, so even a million float16
        frames from a memory-mapped store never need a float32 copy of the whole array.
        """
        self._require_fitted()
        shape = tuple(np.shape(frames))
        if len(shape) != 2:
            raise UnitError(f"frames must be 2-D (T, D), got shape {shape}")
        if shape[1] != self.dim:
            raise UnitError(f"frames have width {shape[1]}, the units were fitted on width {self.dim}")
        mean, std = self.mean.to(device), self.std.to(device)
        centroids = self.centroids.to(device)
        centroid_sq = (centroids * centroids).sum(dim=1)
        labels = np.zeros(shape[0], dtype=np.int64)
        for start in range(0, shape[0], chunk_size):
            xb = (_as_float_tensor(frames[start : start + chunk_size]).to(device) - mean) / std
            labels[start : start + len(xb)] = _nearest(xb, centroids, centroid_sq, chunk_size)[0].cpu().numpy()
        return labels

    # -- persistence -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        self._require_fitted()
        return {"kind": "kmeans_units", "centroids": self.centroids.clone(), "mean": self.mean.clone(),
                "std": self.std.clone(), "inertia": list(self.inertia), "info": dict(self.info)}

    @classmethod
    def from_state(cls, state: dict) -> "KMeansUnits":
        missing = [k for k in ("centroids", "mean", "std") if k not in state]
        if state.get("kind") != "kmeans_units" or missing:
            raise CheckpointError(
                f"not a KMeansUnits state (kind={state.get('kind')!r}, missing {missing}); "
                f"run {PRODUCER} again to remake it"
            )
        centroids, mean, std = (torch.as_tensor(state[k]).float() for k in ("centroids", "mean", "std"))
        if centroids.ndim != 2 or mean.shape != (centroids.shape[1],) or std.shape != mean.shape:
            raise CheckpointError(
                f"inconsistent KMeansUnits state: centroids {tuple(centroids.shape)}, mean {tuple(mean.shape)}, "
                f"std {tuple(std.shape)}; run {PRODUCER} again"
            )
        units = cls()
        units.centroids, units.mean, units.std = centroids, mean, std
        units.inertia = [float(v) for v in state.get("inertia", [])]
        units.info = dict(state.get("info", {}))
        return units

    def save(self, path: str | Path) -> Path:
        """Write the units atomically (``train.save_checkpoint``)."""
        return save_checkpoint(path, self.state_dict())

    @classmethod
    def load(cls, path: str | Path) -> "KMeansUnits":
        """Read units saved by ``save``; a missing file names the notebook that makes it."""
        return cls.from_state(load_checkpoint(path, PRODUCER))


# --------------------------------------------------------------------------------------------
# frame stores -> units
# --------------------------------------------------------------------------------------------


def _check_keys(store, keys: list[str]) -> None:
    missing = [k for k in keys if k not in store]
    if missing:
        raise UnitError(f"{len(missing)} key(s) are not in the frame store {store.path}, e.g. {missing[:3]}")


def sample_store_frames(store, keys: Iterable[str], max_frames: int, seed: int = 0, pool: bool = True) -> np.ndarray:
    """A seeded random subset of at most ``max_frames`` frames of ``keys`` (pooled to 25 Hz first).

    Reads one utterance at a time, so fitting data for ``KMeansUnits.fit`` never needs all frames
    of a large store in memory at once.
    """
    keys = list(keys)
    _check_keys(store, keys)
    lengths = np.array([store.index["items"][k][1] for k in keys], dtype=np.int64)
    if pool:
        lengths = -(-lengths // FRAMES50_PER_UNIT)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    rng = np.random.default_rng(seed)
    take_all = total <= max_frames
    chosen = None if take_all else np.sort(rng.choice(total, size=max_frames, replace=False))
    # chosen is sorted, so the frames of key i are one slice of it
    cuts = None if take_all else np.searchsorted(chosen, offsets)
    parts = []
    for i, key in enumerate(keys):
        if not take_all and cuts[i] == cuts[i + 1]:
            continue  # no frame of this utterance was drawn: do not even read it
        frames = store[key]
        frames = pool_to_unit_rate(frames) if pool else frames
        parts.append(frames if take_all else frames[chosen[cuts[i] : cuts[i + 1]] - offsets[i]])
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, store.dim), dtype=np.float32)


def encode_store(kmeans: KMeansUnits, store, keys: Iterable[str], pool: bool = True,
                 batch_frames: int = 65_536, progress: bool = False) -> dict[str, np.ndarray]:
    """Unit ids (int64, one per 25 Hz frame) of every key of an ``emo_lib.store.FrameStore``.

    Utterances are pooled to 25 Hz (``pool=True``, the store holds 50 Hz Whisper frames) and encoded
    in batches of about ``batch_frames`` frames: one big matrix multiply beats thousands of tiny ones.
    """
    from tqdm.auto import tqdm

    keys = list(keys)
    _check_keys(store, keys)
    out: dict[str, np.ndarray] = {}
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        ids = kmeans.encode(np.concatenate([f for _, f in batch], axis=0))
        ends = np.cumsum([len(f) for _, f in batch])
        for (key, _), piece in zip(batch, np.split(ids, ends[:-1])):
            out[key] = piece
        batch.clear()

    pending = 0
    for key in tqdm(keys, desc="encoding units", unit="utt", disable=not progress):
        frames = store[key]
        frames = pool_to_unit_rate(frames) if pool else frames
        batch.append((key, frames))
        pending += len(frames)
        if pending >= batch_frames:
            flush()
            pending = 0
    if batch:
        flush()
    return {key: out[key] for key in keys}


# --------------------------------------------------------------------------------------------
# prosody tokens
# --------------------------------------------------------------------------------------------


def _unit_index_of_samples(starts: np.ndarray, sr: int) -> np.ndarray:
    """Unit frame that a sample index falls in: floor(sample / sr * 25)."""
    return (np.asarray(starts, dtype=np.int64) * UNIT_HZ) // int(sr)


def f0_to_unit_rate(f0: np.ndarray, hop: int, sr: int, n_frames: int) -> np.ndarray:
    """10 ms F0 track (NaN = unvoiced) -> per-unit F0 in Hz (NaN = unvoiced), ``n_frames`` long.

    F0 frame ``i`` starts at sample ``i * hop`` and belongs to the unit frame that sample falls in
    (with 22050 Hz audio, 4 or 5 F0 frames per unit). A unit is voiced if at least half of its F0
    frames are, and then gets the median of the voiced values: the median ignores the odd octave
    error at a voicing edge. Units beyond the end of the track are unvoiced.
    """
    f0 = np.asarray(f0, dtype=np.float64)
    owner = _unit_index_of_samples(np.arange(len(f0)) * hop, sr)  # sorted
    frames = np.arange(n_frames)
    starts = np.searchsorted(owner, frames, side="left")
    ends = np.searchsorted(owner, frames, side="right")
    width = int((ends - starts).max()) if n_frames else 0
    # (n_frames, width) table of each unit's F0 values, NaN-padded
    index = starts[:, None] + np.arange(width)[None, :]
    inside = index < ends[:, None]
    values = np.where(inside, f0[np.minimum(index, max(len(f0) - 1, 0))] if len(f0) else np.nan, np.nan)
    n_total = ends - starts
    n_voiced = np.isfinite(values).sum(axis=1)
    voiced = (n_total > 0) & (2 * n_voiced >= n_total)
    out = np.full(n_frames, np.nan)
    if voiced.any():
        out[voiced] = np.nanmedian(values[voiced], axis=1)
    return out


def hz_to_pitch_ids(hz: np.ndarray, n_bins: int = PITCH_BINS, fmin: float = PITCH_FMIN,
                    fmax: float = PITCH_FMAX) -> np.ndarray:
    """F0 in Hz (NaN or <= 0 = unvoiced) -> pitch ids: 0 unvoiced, 1..n_bins-1 log-spaced, clipped."""
    hz = np.asarray(hz, dtype=np.float64)
    voiced = np.isfinite(hz) & (hz > 0)
    n_voiced = n_bins - 1
    position = np.log(np.where(voiced, hz, fmin) / fmin) / math.log(fmax / fmin)  # 0 at fmin, 1 at fmax
    ids = 1 + np.clip(np.floor(position * n_voiced), 0, n_voiced - 1)
    return np.where(voiced, ids, 0).astype(np.int64)


def pitch_bin_hz(ids: np.ndarray, n_bins: int = PITCH_BINS, fmin: float = PITCH_FMIN,
                 fmax: float = PITCH_FMAX) -> np.ndarray:
    """Pitch ids -> the geometric centre of each bin in Hz (NaN for 0 = unvoiced), for plots."""
    ids = np.asarray(ids)
    check_units(ids, n_bins, what="pitch id")
    n_voiced = n_bins - 1
    centre = fmin * (fmax / fmin) ** ((ids - 1 + 0.5) / n_voiced)
    return np.where(ids > 0, centre, np.nan)


def pitch_tokens(wav: np.ndarray, sr: int, n_frames: int, n_bins: int = PITCH_BINS,
                 fmin: float = PITCH_FMIN, fmax: float = PITCH_FMAX) -> np.ndarray:
    """(n_frames,) int64 pitch ids of an utterance at 25 Hz (YIN F0 every 10 ms, median per unit).

    ``n_frames`` is the utterance's unit count: the ids are padded (unvoiced) or trimmed to it.
    F0 is estimated up to 500 Hz (``estimate_f0``'s range) and clipped into the bins.
    """
    hop = max(1, int(0.01 * sr))  # the hop estimate_f0 uses for hop_s=0.01
    f0 = estimate_f0(np.asarray(wav, dtype=np.float32), sr, hop_s=0.01)
    return hz_to_pitch_ids(f0_to_unit_rate(f0, hop, sr, n_frames), n_bins, fmin, fmax)


def unit_energy_db(wav: np.ndarray, sr: int, n_frames: int) -> np.ndarray:
    """RMS level in dBFS of each 40 ms unit frame (``-inf``-free: silence is about -120 dB).

    Frame ``t`` is samples ``[round(t sr / 25), round((t+1) sr / 25))``; a frame past the end of
    the audio is silent.
    """
    wav = np.asarray(wav, dtype=np.float64)
    bounds = np.round(np.arange(n_frames + 1) * sr / UNIT_HZ).astype(np.int64)
    bounds = np.minimum(bounds, len(wav))
    cumulative = np.concatenate([[0.0], np.cumsum(wav * wav)])
    sizes = np.diff(bounds)
    energy = (cumulative[bounds[1:]] - cumulative[bounds[:-1]]) / np.maximum(sizes, 1)
    return (10 * np.log10(np.maximum(energy, 0.0) + 1e-12)).astype(np.float32)


def db_to_energy_ids(db: np.ndarray, n_bins: int = ENERGY_BINS, min_db: float = ENERGY_MIN_DB,
                     max_db: float = ENERGY_MAX_DB) -> np.ndarray:
    """dBFS -> energy ids: ``n_bins`` uniform bins between min_db and max_db, clipped at both ends."""
    position = (np.asarray(db, dtype=np.float64) - min_db) / (max_db - min_db)
    return np.clip(np.floor(position * n_bins), 0, n_bins - 1).astype(np.int64)


def energy_bin_db(ids: np.ndarray, n_bins: int = ENERGY_BINS, min_db: float = ENERGY_MIN_DB,
                  max_db: float = ENERGY_MAX_DB) -> np.ndarray:
    """Energy ids -> the centre of each bin in dBFS, for plots."""
    ids = np.asarray(ids)
    check_units(ids, n_bins, what="energy id")
    return min_db + (ids + 0.5) * (max_db - min_db) / n_bins


def energy_tokens(wav: np.ndarray, sr: int, n_frames: int, n_bins: int = ENERGY_BINS,
                  min_db: float = ENERGY_MIN_DB, max_db: float = ENERGY_MAX_DB) -> np.ndarray:
    """(n_frames,) int64 energy ids of an utterance at 25 Hz (padded with silence or trimmed)."""
    return db_to_energy_ids(unit_energy_db(wav, sr, n_frames), n_bins, min_db, max_db)


def prosody_tokens(wav: np.ndarray, sr: int, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(pitch_ids, energy_ids), each (n_frames,) int64, with the module's default bins."""
    if n_frames < 0:
        raise UnitError(f"n_frames must be >= 0, got {n_frames}")
    return pitch_tokens(wav, sr, n_frames), energy_tokens(wav, sr, n_frames)


# --------------------------------------------------------------------------------------------
# checks and diagnostics
# --------------------------------------------------------------------------------------------


def check_units(units, n_units: int, what: str = "unit id") -> np.ndarray:
    """``units`` as an int64 array, or a UnitError naming the first id outside ``[0, n_units)``."""
    array = np.asarray(units)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise UnitError(f"{what}s must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = np.flatnonzero((array < 0) | (array >= n_units))
    if bad.size:
        first = int(bad[0])
        raise UnitError(
            f"{what} {int(array.flat[first])} at position {first} is outside [0, {n_units}) "
            f"({bad.size} bad id(s) in all)"
        )
    return array


def unit_usage(units_list: Iterable[np.ndarray], n_units: int) -> np.ndarray:
    """(n_units,) int64: how often each unit occurs over all utterances (dead units show as 0)."""
    counts = np.zeros(n_units, dtype=np.int64)
    for units in units_list:
        counts += np.bincount(check_units(units, n_units).ravel(), minlength=n_units)
    return counts


def perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of a usage histogram: the number of equally used units it is worth.

    ``n_units`` when every unit is used equally, 1 when one unit does everything: compare it with
    the codebook size to see how much of the codebook is really used.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise UnitError("perplexity of an empty histogram: no units were counted")
    p = counts[counts > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_information(a, b) -> float:
    """NMI between two labelings of the same frames: I(A; B) / mean(H(A), H(B)), in [0, 1].

    1 when each labeling determines the other (up to renaming), 0 when they are independent.
    ``a`` = unit ids, ``b`` = the speaker (or emotion) of each frame: a high value means the units
    encode the speaker. Labels can be any hashable values numpy can sort (ints, strings). Two
    constant labelings count as identical (1.0). Note that a finite sample makes independent
    labelings score slightly above 0 (by roughly ``(|A|-1)(|B|-1) / (2N)`` nats of MI).
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if len(a) != len(b):
        raise UnitError(f"the two labelings have different lengths: {len(a)} and {len(b)}")
    if len(a) == 0:
        raise UnitError("normalized mutual information of empty labelings")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    na, nb = int(ia.max()) + 1, int(ib.max()) + 1
    joint = np.bincount(ia * nb + ib, minlength=na * nb).reshape(na, nb).astype(np.float64)
    h_a, h_b = _entropy(joint.sum(axis=1)), _entropy(joint.sum(axis=0))
    if h_a == 0.0 and h_b == 0.0:
        return 1.0
    mutual = h_a + h_b - _entropy(joint.ravel())
    return float(np.clip(mutual / (0.5 * (h_a + h_b)), 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# A whole run: every kept utterance -> (unit, pitch, energy) frames and its HiFi-GAN log-mel
# ---------------------------------------------------------------------------------------------
def acoustic_targets(path: str | Path, n_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pitch ids, energy ids (``n_frames`` at 25 Hz) and the (T_mel, 80) float16 log-mel of one wav file.

    The mel uses the packaged HiFi-GAN's conventions (22.05 kHz, hop 256): it is token2mel's
    training target. Runs in worker processes too.
    """
    from .audio import hifigan_log_mel, load_audio

    torch.set_num_threads(1)  # one process per core: no thread oversubscription
    wav, sr = load_audio(path, target_sr=22050)
    pitch, energy = prosody_tokens(wav, sr, n_frames)
    mel = hifigan_log_mel(wav, sr).T.numpy().astype(np.float16)
    return pitch, energy, mel


def _acoustic_targets_job(job: tuple[str, int]):
    return acoustic_targets(*job)


def tokenize_utterances(kmeans: KMeansUnits, store, paths: dict[str, Path], workers: int = 1,
                        progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Speech tokens and mels of the utterances ``paths`` (key -> wav file; keys as in ``store``).

    Returns ``(tokens, mels)``: ``tokens[key]`` is an int64 (T, 3) array of (unit, pitch, energy)
    per 25 Hz frame, ``mels[key]`` the float16 (T_mel, 80) log-mel. Units come from the stored
    Whisper frames (``store``, 50 Hz, pooled to 25 Hz); pitch and energy from the audio, computed in
    ``workers`` processes (YIN pitch tracking is single-threaded NumPy). Same numbers either way.
    """
    from tqdm.auto import tqdm

    keys = list(paths)
    units = encode_store(kmeans, store, keys, progress=progress)
    jobs = [(str(paths[k]), len(units[k])) for k in keys]
    bar = tqdm(total=len(jobs), desc="pitch, energy, mel", unit="wav", disable=not progress)
    results = []
    if workers > 1 and len(jobs) >= 4 * workers:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # "spawn": a forked child of a process whose OpenMP threads already ran can hang.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for out in pool.map(_acoustic_targets_job, jobs, chunksize=16):
                results.append(out)
                bar.update()
    else:
        threads = torch.get_num_threads()
        for job in jobs:
            results.append(_acoustic_targets_job(job))
            bar.update()
        torch.set_num_threads(threads)
    bar.close()
    tokens, mels = {}, {}
    for key, (pitch, energy, mel) in zip(keys, results):
        tokens[key] = np.stack([units[key], pitch, energy], axis=1).astype(np.int64)
        mels[key] = mel
    return tokens, mels
