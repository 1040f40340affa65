import math

import numpy as np
import pytest
import torch

from emo_lib.paths import MissingInputError
from emo_lib.speech_tokens import (
    ENERGY_BINS,
    PITCH_BINS,
    KMeansUnits,
    UnitError,
    check_units,
    db_to_energy_ids,
    encode_store,
    energy_bin_db,
    energy_tokens,
    f0_to_unit_rate,
    hz_to_pitch_ids,
    normalized_mutual_information,
    perplexity,
    pitch_bin_hz,
    pitch_tokens,
    pool_to_unit_rate,
    prosody_tokens,
    sample_store_frames,
    unit_energy_db,
    unit_usage,
)
from emo_lib.store import FrameStore, write_frame_store
from emo_lib.train import CheckpointError

SR = 22050


def blobs(n_per: int = 200, seed: int = 0):
    """Four clusters at the corners of a tetrahedron (every dimension splits them 2 / 2), in 6-D.

    Dimension 0 is on a 1000x larger scale (centres and noise): unstandardised, k-means would only
    see it and cut the two halves it separates along its noise.
    """
    rng = np.random.default_rng(seed)
    corners = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
    scale = np.array([1000.0, 1, 1, 1, 1, 1])
    centres = np.concatenate([corners, corners[:, ::-1]], axis=1) * 10 * scale
    labels = np.repeat(np.arange(4), n_per)
    x = centres[labels] + rng.standard_normal((len(labels), 6)) * 0.5 * scale
    order = rng.permutation(len(labels))
    return x[order].astype(np.float32), labels[order], centres


def tone(freq: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---- pooling ------------------------------------------------------------------------------------


def test_pool_to_unit_rate_pairs_and_odd_tail():
    frames = np.arange(10, dtype=np.float32).reshape(5, 2)
    pooled = pool_to_unit_rate(frames)
    assert pooled.shape == (3, 2)
    assert np.allclose(pooled, [[1, 2], [5, 6], [8, 9]])  # last frame alone
    assert pool_to_unit_rate(np.zeros((0, 3))).shape == (0, 3)
    with pytest.raises(UnitError, match="shape"):
        pool_to_unit_rate(np.zeros(4))


# ---- k-means -------------------------------------------------------------------------------------


def test_kmeans_recovers_clusters_and_inertia_never_rises():
    x, labels, centres = blobs()
    km = KMeansUnits().fit(x, n_units=4, iters=20, seed=0)
    units = km.encode(x)
    assert units.dtype == np.int64 and units.shape == (len(x),)
    # standardisation keeps the loud noise dimension from deciding alone: clusters are found exactly
    assert normalized_mutual_information(units, labels) == pytest.approx(1.0)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(km.inertia, km.inertia[1:]))
    assert km.info["iterations"] < 20  # converged early (no frame changed its unit)
    # centroids in the original space sit on the true centres
    found = km.cluster_centers()
    scale = np.array([1000.0, 1, 1, 1, 1, 1])
    for c in centres:
        nearest = found[np.argmin((((found - c) / scale) ** 2).sum(axis=1))]
        assert np.allclose(nearest / scale, c / scale, atol=0.2)


def test_kmeans_is_seeded_chunk_independent_and_subsamples():
    x, _, _ = blobs(n_per=300, seed=1)
    a = KMeansUnits().fit(x, n_units=8, iters=5, seed=3, max_samples=500)
    b = KMeansUnits().fit(x, n_units=8, iters=5, seed=3, max_samples=500, chunk_size=37)
    assert a.info["n_fit"] == 500 and a.info["n_frames"] == len(x)
    assert torch.allclose(a.centroids, b.centroids, atol=1e-5)
    assert np.array_equal(a.encode(x), a.encode(x, chunk_size=11))
    c = KMeansUnits().fit(x, n_units=8, iters=5, seed=4, max_samples=500)
    assert not torch.allclose(a.centroids, c.centroids)
    # the caller's array is left untouched
    x_copy = x.copy()
    KMeansUnits().fit(x, n_units=4, iters=2, seed=0, max_samples=None)
    assert np.array_equal(x, x_copy)


def test_kmeans_reseeds_empty_units():
    x = np.repeat(np.eye(3, dtype=np.float32) * 5, 20, axis=0)  # 3 distinct points
    # k-means++ on a 1-frame sample puts all 3 centroids on one point: two units go empty at once
    # and must be re-seeded at the worst-served frames, which ends with every point its own unit
    km = KMeansUnits().fit(x, n_units=3, iters=5, seed=0, init_samples=1)
    assert km.inertia[0] > 0 and km.inertia[-1] == pytest.approx(0.0, abs=1e-6)
    assert len(np.unique(km.encode(x))) == 3
    # more units than distinct points: duplicates are harmless (finite centroids, zero inertia)
    km = KMeansUnits().fit(x, n_units=5, iters=5, seed=0)
    assert torch.isfinite(km.centroids).all() and km.inertia[-1] == pytest.approx(0.0, abs=1e-6)


def test_kmeans_errors():
    with pytest.raises(UnitError, match="not fitted"):
        KMeansUnits().encode(np.zeros((2, 3)))
    with pytest.raises(UnitError, match="cannot fit 10 units to 5 frames"):
        KMeansUnits().fit(np.zeros((5, 3)), n_units=10)
    with pytest.raises(UnitError, match="NaN"):
        KMeansUnits().fit(np.full((5, 3), np.nan), n_units=2)
    km = KMeansUnits().fit(np.random.default_rng(0).standard_normal((50, 3)), n_units=2, iters=2)
    with pytest.raises(UnitError, match="width 4.*width 3"):
        km.encode(np.zeros((2, 4)))
    assert km.encode(np.zeros((0, 3))).shape == (0,)


def test_kmeans_save_load_roundtrip(tmp_path):
    x, _, _ = blobs(n_per=50)
    km = KMeansUnits().fit(x, n_units=4, iters=3, seed=0)
    path = km.save(tmp_path / "units.pt")
    back = KMeansUnits.load(path)
    assert np.array_equal(back.encode(x), km.encode(x))
    assert back.inertia == km.inertia and back.n_units == 4 and back.dim == 6
    with pytest.raises(MissingInputError, match="05_tokens.ipynb"):
        KMeansUnits.load(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="not a KMeansUnits state"):
        KMeansUnits.from_state({"weights": 1})


# ---- frame stores ------------------------------------------------------------------------------------


def test_encode_store_and_sample_store_frames(tmp_path):
    rng = np.random.default_rng(0)
    items = {f"p{i}_r": rng.standard_normal((n, 6)).astype(np.float32) for i, n in enumerate([7, 4, 1, 12])}
    write_frame_store(tmp_path / "semantic.npy", items.items())
    store = FrameStore(tmp_path / "semantic.npy")
    km = KMeansUnits().fit(rng.standard_normal((200, 6)), n_units=5, iters=3)

    keys = ["p3_r", "p0_r", "p2_r"]
    units = encode_store(km, store, keys, batch_frames=4)  # several batches
    assert list(units) == keys
    for key in keys:
        assert units[key].dtype == np.int64 and len(units[key]) == math.ceil(len(items[key]) / 2)
        assert np.array_equal(units[key], km.encode(pool_to_unit_rate(store[key])))
    raw = encode_store(km, store, keys, pool=False)
    assert len(raw["p3_r"]) == 12
    with pytest.raises(UnitError, match="not in the frame store"):
        encode_store(km, store, ["p9_q"])

    everything = sample_store_frames(store, store.keys(), max_frames=100)
    assert everything.shape == (4 + 2 + 1 + 6, 6)
    some = sample_store_frames(store, store.keys(), max_frames=5, seed=1)
    assert some.shape == (5, 6)
    assert all(np.isclose(everything, row, atol=1e-6).all(axis=1).any() for row in some)
    assert np.array_equal(some, sample_store_frames(store, store.keys(), max_frames=5, seed=1))


# ---- prosody tokens --------------------------------------------------------------------------------------


def test_f0_to_unit_rate_median_and_voicing_rule():
    # sr 1000, hop 10: exactly 4 F0 frames per 40 ms unit
    nan = np.nan
    f0 = np.array([100, 100, nan, nan, 100, nan, nan, nan, 100, 200, 300, nan])
    out = f0_to_unit_rate(f0, hop=10, sr=1000, n_frames=4)
    assert out[0] == 100  # half voiced counts as voiced
    assert np.isnan(out[1])  # a quarter voiced is unvoiced
    assert out[2] == 200  # the median of the voiced values
    assert np.isnan(out[3])  # padding past the end
    assert len(f0_to_unit_rate(f0, hop=10, sr=1000, n_frames=2)) == 2


def test_pitch_ids_bins_and_inverse():
    ids = hz_to_pitch_ids(np.array([np.nan, 0.0, 30.0, 60.0, 100.0, 399.0, 400.0, 1000.0]))
    assert list(ids[:4]) == [0, 0, 1, 1]
    assert list(ids[-3:]) == [PITCH_BINS - 1] * 3
    assert 1 < ids[4] < PITCH_BINS - 1
    freqs = np.geomspace(61, 399, 200)
    ids = hz_to_pitch_ids(freqs)
    assert np.all(np.diff(ids) >= 0) and set(ids) == set(range(1, PITCH_BINS))
    ratio = (400 / 60) ** (1 / (PITCH_BINS - 1))
    assert np.all(np.abs(np.log(pitch_bin_hz(ids) / freqs)) <= np.log(ratio) / 2 + 1e-9)
    assert np.isnan(pitch_bin_hz(np.array([0]))[0])
    with pytest.raises(UnitError, match=f"pitch id {PITCH_BINS} at position 0"):
        pitch_bin_hz(np.array([PITCH_BINS]))


def test_pitch_tokens_follow_a_tone_and_silence():
    wav = np.concatenate([tone(150, 0.4), np.zeros(int(0.4 * SR), np.float32), tone(300, 0.4)])
    ids = pitch_tokens(wav, SR, n_frames=35)  # 30 frames of audio, 5 padded
    assert ids.dtype == np.int64 and ids.shape == (35,)
    assert np.all(ids[1:8] == hz_to_pitch_ids(np.array([150.0]))[0])
    assert np.all(ids[12:18] == 0)
    assert np.all(ids[22:28] == hz_to_pitch_ids(np.array([300.0]))[0])
    assert np.all(ids[30:] == 0)
    assert len(pitch_tokens(wav, SR, n_frames=10)) == 10


def test_energy_tokens_levels_and_padding():
    wav = np.concatenate([tone(150, 0.4, 0.1), np.zeros(int(0.4 * SR), np.float32), tone(150, 0.4, 0.9)])
    db = unit_energy_db(wav, SR, 30)
    assert db[3] == pytest.approx(20 * np.log10(0.1 / np.sqrt(2)), abs=0.1)  # 40 ms = 6 whole periods
    ids = energy_tokens(wav, SR, n_frames=32)
    expected_quiet = int((20 * np.log10(0.1 / np.sqrt(2)) + 60) / 50 * ENERGY_BINS)
    assert np.all(ids[:10] == expected_quiet)
    assert np.all(ids[10:20] == 0)
    assert np.all(ids[20:30] == ENERGY_BINS - 1)  # -4 dB is above the top edge (-10 dB): clipped
    assert np.all(ids[30:] == 0)  # padding is silence
    assert list(db_to_energy_ids(np.array([-200.0, -60.0, -35.1, -10.0, 5.0]))) == [0, 0, 3, 7, 7]
    assert np.allclose(energy_bin_db(np.arange(ENERGY_BINS)), np.linspace(-60, -10, ENERGY_BINS + 1)[:-1] + 50 / 16)
    pitch, energy = prosody_tokens(wav, SR, n_frames=12)
    assert pitch.shape == energy.shape == (12,)


# ---- checks and diagnostics ------------------------------------------------------------------------------


def test_check_units_names_the_bad_id():
    assert check_units([0, 3, 4], 5).dtype == np.int64
    with pytest.raises(UnitError, match=r"unit id 7 at position 2 is outside \[0, 5\)"):
        check_units(np.array([0, 1, 7, 9]), 5)
    with pytest.raises(UnitError, match="unit id -1 at position 0"):
        check_units([-1], 5)
    with pytest.raises(UnitError, match="integers"):
        check_units(np.array([0.5]), 5)


def test_usage_and_perplexity():
    counts = unit_usage([np.array([0, 1, 1]), np.array([3])], n_units=5)
    assert list(counts) == [1, 2, 0, 1, 0]
    assert perplexity(np.ones(16)) == pytest.approx(16)
    assert perplexity(np.array([0, 9, 0])) == pytest.approx(1)
    assert 1 < perplexity(counts) < 3
    with pytest.raises(UnitError, match="unit id 5"):
        unit_usage([np.array([5])], n_units=5)
    with pytest.raises(UnitError, match="empty"):
        perplexity(np.zeros(3))


def test_normalized_mutual_information_known_cases():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 8, 20_000)
    assert normalized_mutual_information(a, a) == pytest.approx(1.0)
    renamed = np.array(["spk" + str(9 - v) for v in a])  # a relabeling: still 1
    assert normalized_mutual_information(a, renamed) == pytest.approx(1.0)
    assert normalized_mutual_information(a, rng.integers(0, 8, 20_000)) < 0.005
    assert normalized_mutual_information([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # b is a coarsening of a: I = H(b) = ln 2, H(a) = ln 4 -> NMI = ln2 / (1.5 ln2) = 2/3
    assert normalized_mutual_information([0, 1, 2, 3], [0, 0, 1, 1]) == pytest.approx(2 / 3)
    assert normalized_mutual_information([1, 1, 1], [2, 2, 2]) == 1.0
    assert normalized_mutual_information([1, 1, 1], [0, 1, 2]) == pytest.approx(0.0)
    with pytest.raises(UnitError, match="lengths: 3 and 2"):
        normalized_mutual_information([1, 2, 3], [1, 2])


def test_tokenize_utterances_gives_aligned_tokens_and_mels(tmp_path):
    from emo_lib import speech_tokens as S
    from emo_lib.audio import save_wav

    sr = 22050
    rng = np.random.default_rng(0)
    paths, frames = {}, []
    for i, (seconds, hz) in enumerate([(1.3, 150.0), (0.9, 240.0)]):
        t = np.arange(int(seconds * sr)) / sr
        wav = (0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * rng.normal(size=len(t))).astype(np.float32)
        paths[f"u{i}"] = save_wav(tmp_path / f"u{i}.wav", wav, sr)
        t50 = math.ceil(len(wav) / sr * 16000 / 320)  # Whisper frames at 50 Hz, as notebook 02 stores them
        frames.append((f"u{i}", rng.normal(size=(t50, 6)).astype(np.float32)))
    store = FrameStore(write_frame_store(tmp_path / "semantic.npy", frames))
    kmeans = S.KMeansUnits().fit(np.concatenate([f for _, f in frames]), n_units=4, iters=5, seed=0)
    tokens, mels = S.tokenize_utterances(kmeans, store, paths, workers=1)
    for (key, f50), (seconds, hz) in zip(frames, [(1.3, 150.0), (0.9, 240.0)]):
        assert tokens[key].shape == (math.ceil(len(f50) / 2), 3)  # one row per 25 Hz frame
        assert tokens[key][:, 0].max() < 4 and tokens[key][:, 2].max() < S.ENERGY_BINS
        voiced = tokens[key][:, 1][tokens[key][:, 1] > 0]
        assert abs(np.median(S.pitch_bin_hz(voiced)) / hz - 1) < 0.05  # the pitch tokens hear the tone
        assert mels[key].shape[1] == 80 and abs(mels[key].shape[0] - seconds * sr / 256) <= 2
