"""GlobalModel: initialisation, pickle-free save/load, and clear errors on bad files."""

import numpy as np
import pytest

import fedrecon_fast as ff


@pytest.mark.parametrize("biases", [False, True])
def test_save_load_round_trip(tmp_path, biases):
    cfg = ff.preset("paper", biases=biases, dim=6)
    model = ff.GlobalModel.initialize(np.arange(10, 30), cfg, global_mean=3.5)
    model.item_factors[0, 0] = 42.0
    path = model.save(tmp_path / "m")
    back = ff.GlobalModel.load(path)
    assert np.array_equal(back.item_factors, model.item_factors)
    assert np.array_equal(back.item_ids, model.item_ids)
    assert (back.item_bias is None) == (not biases)
    assert back.global_mean == (3.5 if biases else 0.0)
    assert back.config == cfg
    # Saving again over an existing model replaces it.
    model.item_factors[0, 0] = -1.0
    model.save(path)
    assert ff.GlobalModel.load(path).item_factors[0, 0] == -1.0


def test_initialization_is_uniform_and_seeded():
    cfg = ff.preset("paper", dim=50)
    a = ff.GlobalModel.initialize(np.arange(500), cfg)
    assert a.item_factors.dtype == np.float32 and a.item_factors.shape == (500, 50)
    assert np.abs(a.item_factors).max() <= 0.05 and a.item_factors.std() > 0.02
    assert np.array_equal(a.item_factors, ff.GlobalModel.initialize(np.arange(500), cfg).item_factors)


def test_load_rejects_bad_files(tmp_path):
    # More in test_bundle.py: every byte verified, the schema, odd file types, old files.
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        ff.GlobalModel.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ff.GlobalModel.load(tmp_path / "nowhere")
    model = ff.GlobalModel.initialize(np.arange(5), ff.preset("paper", dim=2))
    path = model.save(tmp_path / "m")
    (path / "manifest").write_text("{not json")
    with pytest.raises(ValueError, match="not a fedrecon_fast manifest"):
        ff.GlobalModel.load(path)
    path = model.save(tmp_path / "m2")
    (path / "item_factors.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="item_factors.npy has 7 bytes"):
        ff.GlobalModel.load(path)


def test_model_validates_arrays():
    with pytest.raises(ValueError, match="item_factors"):
        ff.GlobalModel(np.full((3, 2), np.nan), None, 0.0, np.arange(3))
    with pytest.raises(ValueError, match="item_bias"):
        ff.GlobalModel(np.zeros((3, 2)), np.zeros(4), 0.0, np.arange(3))
    with pytest.raises(ValueError, match="item_ids"):
        ff.GlobalModel(np.zeros((3, 2)), None, 0.0, np.arange(4))
