import numpy as np
import pytest

from emo_lib.store import FrameStore, write_frame_store


def test_frame_store_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    items = {f"u{i}": rng.standard_normal((n, 4)).astype(np.float32) for i, n in enumerate([3, 1, 7])}
    write_frame_store(tmp_path / "s.npy", items.items(), meta={"hz": 50})
    store = FrameStore(tmp_path / "s.npy")
    assert len(store) == 3 and store.dim == 4 and "u1" in store
    for key, value in items.items():
        assert np.allclose(store[key], value, atol=1e-2)
    assert store.index["meta"] == {"hz": 50}


def test_frame_store_errors(tmp_path):
    with pytest.raises(ValueError, match="width"):
        write_frame_store(tmp_path / "s.npy", [("a", np.zeros((2, 3))), ("b", np.zeros((2, 4)))])
    with pytest.raises(FileNotFoundError, match="missing"):
        FrameStore(tmp_path / "nothing.npy")
