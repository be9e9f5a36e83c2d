"""Regression tests of the bugs found by fuzzing (tests/test_fuzz.py) and by the sanitizer run
(tools/sanitize.sh), and the CLI's error contract checked on real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import aggregation, cli, compression, kernels, privacy
from fedrecon_fast._native import core as _core
from fedrecon_fast._native.structs import client_config
from fedrecon_fast._validation import check_choice, check_float
from fedrecon_fast.cli import main


@pytest.fixture
def small():
    data = ff.ClientData.from_coo([0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 2, 1, 3, 0, 2, 3, 4], [4, 3, 5, 2, 1, 5, 4, 3, 2])
    V = np.random.default_rng(0).uniform(-0.5, 0.5, (5, 3)).astype(np.float32)
    return data, V


# ------------------------------------------------------------------ numbers of any integer type


def test_numpy_integer_seeds_are_taken_modulo_2_64():
    # Was: OverflowError ("Python int too large to convert to C long") from np.int64 % 2**64.
    x = np.linspace(-1, 1, 12, dtype=np.float32)
    a = compression.quantize(x, 4, seed=np.uint64(2**64 - 1), round=np.int32(2), client=np.int64(3))
    b = compression.quantize(x, 4, seed=2**64 - 1, round=2, client=3)
    assert np.array_equal(a, b)
    assert ff.derive_seed(np.int64(1), np.uint8(2), np.int64(3), np.int64(4)) == ff.derive_seed(1, 2, 3, 4)
    with pytest.raises(TypeError, match="stream"):
        ff.derive_seed(1, 2, 3, "4")
    noise = privacy.gaussian_noise(4, 1.0, seed=np.uint64(7), round=np.int64(1))
    assert np.array_equal(noise, privacy.gaussian_noise(4, 1.0, seed=7, round=1))


def test_kernels_take_numpy_integer_seeds_and_bools(small):
    data, V = small
    a = kernels.train_round(
        V,
        data,
        seed=np.int64(5),
        round=np.uint64(1),
        codec=ff.UpdateCodec(bits=np.int64(8), hadamard=np.bool_(False), sparse=np.bool_(True)),
    )
    b = kernels.train_round(V, data, seed=5, round=1, codec=ff.UpdateCodec(bits=8))
    assert np.array_equal(a.delta, b.delta)


def test_check_float_of_an_int_beyond_the_float_range():
    with pytest.raises(ValueError, match="x must be finite"):
        check_float(2**1100, "x")


# ------------------------------------------------------------------ shapes, dtypes, sizes


def test_clip_by_norm_keeps_a_0d_update_0d():
    clipped, was, norm = privacy.clip_by_norm(np.float32(3.0), 1.0)
    assert clipped.shape == () and was and norm == 3.0 and clipped == np.float32(1.0)


@pytest.mark.parametrize(
    "call",
    [
        lambda: aggregation.weighted_mean(np.array([[1e300, 0.0]]), dtype=np.float64),
        lambda: aggregation.weighted_mean([np.array([1.0, -1e39])]),
        lambda: privacy.clip_by_norm(np.array([1e300]), 1.0),
        lambda: kernels.train_round(np.full((5, 3), 1e300), ff.ClientData([0, 1], [0], [1.0]), check_finite=False),
        lambda: compression.encode(np.array([1e39, 0.0]), 8),
    ],
    ids=["weighted_mean-stack", "weighted_mean-list", "clip_by_norm", "train_round", "encode"],
)
def test_float64_beyond_float32_is_a_named_error_not_a_warning(call):
    # Was: RuntimeWarning "overflow encountered in cast", then "contains NaN or infinite values"
    # (or, with check_finite=False, silently infinite item factors).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(
            ValueError,
            match=r"(updates|update|item_factors|x)(\[0\])? has values beyond the "
            "float32 range",
        ):
            call()


@pytest.mark.parametrize("shape", [(2**31 - 1, 2**33), (3, 2**62)])
def test_accumulators_reject_shapes_whose_size_overflows(shape):
    # Was: num_rows * dim overflowed int64 in the native accumulator (undefined behaviour), and
    # result() raised NumPy's "array is too big" naming nothing.
    with pytest.raises(ValueError, match="shape .* is too large"):
        aggregation.WeightedMean(shape)
    with pytest.raises(ValueError, match="shape .* is too large"):
        privacy.DPGaussianSum(shape, clip=1.0, noise_multiplier=0.0, seed=0)
    with pytest.raises(ValueError, match="num_rows \\* dim is too large"):
        _core.WeightedSum(shape[0], int(np.prod(shape[1:], dtype=object)) if shape[1] < 2**62 else shape[1])
    with pytest.raises(ValueError, match="shape\\[0\\]"):
        privacy.gaussian_noise((2**40, 2**40), 1.0, seed=0)


def test_evaluate_users_k_beyond_the_catalogue_allocates_nothing(small):
    # Was: std::bad_alloc (MemoryError) for k = 2**40: the ranking scratch had k slots.
    data, V = small
    a = kernels.evaluate_users(V, data, k=2**40)
    b = kernels.evaluate_users(V, data, k=V.shape[0])
    for key in ("hits", "num_relevant"):
        assert np.array_equal(a[key], b[key])
    assert np.array_equal(a["ndcg"], b["ndcg"], equal_nan=True)


def test_recommend_users_rejects_a_result_too_large_to_allocate(small):
    data, V = small
    with pytest.raises(ValueError, match="k is too large"):
        kernels.recommend_users(V, data, k=2**62)


# ------------------------------------------------------------------ messages name the argument


def test_wire_format_errors_name_the_buffer():
    good = compression.encode(np.ones(4, np.float32), 8)
    bad = b"FRQW" + bytes(20)
    for fn in (compression.decode, compression.decode_sparse, compression.buffer_info):
        with pytest.raises(ValueError, match="^buf: unsupported format version 0"):
            fn(bad)
    with pytest.raises(ValueError, match="^buf: "):
        compression.decode_accumulate(bad, 1.0, np.zeros(4))
    with pytest.raises(ValueError, match=r"^bufs\[1\]: "):
        compression.decode_accumulate_batch([good, bad], [1.0, 1.0], np.zeros(4))
    with pytest.raises(ValueError, match=r"^bufs\[0\]: the buffer holds an array of shape \(4,\)"):
        compression.decode_accumulate_batch([good], [1.0], np.zeros(5))


@pytest.mark.parametrize("fractions", ["abc", ["a", 1, 0], None, 3])
def test_split_fractions_errors_name_fractions(fractions):
    with pytest.raises(TypeError, match="fractions"):
        ff.split_users(10, fractions)


def test_check_choice_of_an_unhashable_value():
    with pytest.raises(TypeError, match="weighting must be one of"):
        check_choice([], "weighting", {"examples": 0})
    with pytest.raises(TypeError, match="weighting must be one of"):
        ff.ClientConfig(weighting=[])


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"user_split": "abc"}, "user_split"),
        ({"user_split": None}, "user_split"),
        ({"user_split": (0.5, float("nan"), 0.5)}, "user_split"),
        ({"server_options": [1]}, "server_options"),
    ],
)
def test_config_container_fields_are_named(changes, field):
    with pytest.raises((TypeError, ValueError), match=field):
        ff.FedReconConfig(**changes)


def test_configs_store_python_numbers_so_models_save(tmp_path):
    # Was: np.int64/np.float64 field values were kept, to_dict() was not JSON, and saving a
    # model trained with such a config failed ("Object of type int64 is not JSON serializable").
    cfg = ff.FedReconConfig(
        dim=np.int64(2),
        rounds=np.int32(1),
        server_lr=np.float64(0.5),
        client=ff.ClientConfig(batch_size=np.int64(3), client_lr=np.float32(0.25)),
    )
    assert type(cfg.dim) is int and type(cfg.server_lr) is float
    assert type(cfg.client.batch_size) is int and type(cfg.client.client_lr) is float
    json.dumps(cfg.to_dict())
    model = ff.GlobalModel.initialize(np.arange(4), cfg)
    assert ff.GlobalModel.load(model.save(tmp_path / "m")).config == cfg


# ------------------------------------------------------------------ CLI


def _cli(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def ratings_file(tmp_path):
    path = tmp_path / "ratings.dat"
    rng = np.random.default_rng(0)
    lines = [
        f"{u}::{i}::{rng.integers(1, 6)}::{1000 + k}"
        for k, (u, i) in enumerate((u, i) for u in range(1, 41) for i in rng.choice(30, 6, replace=False) + 1)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_usage_errors_are_one_line(capsys):
    # Was: argparse printed its 13-line usage block before the error.
    code, _, err = _cli(["train", "--dim", "0"], capsys)
    assert code == 2
    assert _one_line(err).startswith("fedrecon-fast train: error: argument --dim: expected an integer >= 1")
    code, _, err = _cli(["train", "--bogus"], capsys)
    assert code == 2 and "--bogus" in _one_line(err)


def test_cli_zero_rounds_with_outputs(ratings_file, tmp_path, capsys):
    # Was: the summary crashed formatting the median round time of no rounds, after --out and
    # --save had been written: exit 2 with outputs left behind.
    code, out, err = _cli(
        [
            "train",
            "--data",
            ratings_file,
            "--rounds",
            "0",
            "--dim",
            "2",
            "--no-progress",
            "--out",
            tmp_path / "out",
            "--save",
            tmp_path / "model",
        ],
        capsys,
    )
    assert code == 0, err
    assert "no rounds" in out
    assert (tmp_path / "out" / "metrics.json").is_file() and (tmp_path / "model" / "manifest").is_file()


def test_cli_failed_save_leaves_no_outputs(ratings_file, tmp_path, capsys, monkeypatch):
    def broken_save(self, path):
        raise OSError(f"disk full while writing {path}")

    monkeypatch.setattr(ff.GlobalModel, "save", broken_save)
    out_dir = tmp_path / "nested" / "out"
    code, _, err = _cli(
        [
            "train",
            "--data",
            ratings_file,
            "--rounds",
            "1",
            "--clients-per-round",
            "3",
            "--dim",
            "2",
            "--no-progress",
            "--out",
            out_dir,
            "--save",
            tmp_path / "model",
        ],
        capsys,
    )
    assert code == 2 and "disk full" in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.dat"], "outputs or temporary folders left"


def test_cli_out_over_an_existing_folder_keeps_its_files(ratings_file, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    code, _, err = _cli(
        [
            "train",
            "--data",
            ratings_file,
            "--rounds",
            "1",
            "--clients-per-round",
            "3",
            "--dim",
            "2",
            "--no-progress",
            "--out",
            out_dir,
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "learning_curve.png",
        "metrics.csv",
        "metrics.json",
        "notes.txt",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ratings.dat"]


@pytest.mark.parametrize("option", ["--out", "--save"])
def test_cli_output_in_the_way_fails_before_training(ratings_file, tmp_path, capsys, option, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(cli, "FedRecon", None)  # training must not start
    code, _, err = _cli(["train", "--data", ratings_file, option, blocker / "sub"], capsys)
    assert code == 2 and f"{option} {blocker / 'sub'}: {blocker} exists and is not a folder" in _one_line(err)


def test_cli_too_few_users_for_a_training_split(tmp_path, capsys):
    path = tmp_path / "u.data"
    path.write_text("1\t1\t5\t0\n")
    code, _, err = _cli(["train", "--data", path, "--rounds", "1"], capsys)
    assert code == 2 and "leave no training users" in _one_line(err) and str(path) in err


def test_cli_internal_errors_are_one_line(ratings_file, capsys, monkeypatch):
    def bug(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "run_train", bug)
    code, _, err = _cli(["train", "--data", ratings_file], capsys)
    assert code == 1
    assert _one_line(err) == (
        "fedrecon-fast: internal error: RuntimeError: something broke "
        "(set FEDRECON_TRACEBACK=1 for the traceback; please report it)"
    )
    monkeypatch.setenv("FEDRECON_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        main(["train", "--data", str(ratings_file)])


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("robust") / "model"
    trainer = ff.FedRecon(ff.preset("paper", dim=2, rounds=1, clients_per_round=4))
    trainer.fit(ff.synthetic_ratings(num_users=20, num_items=30, min_ratings=5, mean_ratings=8, seed=2))
    trainer.model.save(path)
    return path


def test_cli_recommend_binary_or_folder_ratings_name_the_file(saved_model, tmp_path, capsys):
    # Was: "'utf-8' codec can't decode byte 0xff in position 0: ..." without the file.
    path = tmp_path / "r.csv"
    path.write_bytes(b"\xff\xfe1,5\n")
    code, _, err = _cli(["recommend", "--model", saved_model, "--ratings", path], capsys)
    assert code == 2 and f"{path}: not UTF-8 text" in _one_line(err)
    code, _, err = _cli(["recommend", "--model", saved_model, "--ratings", tmp_path], capsys)
    assert code == 2 and f"{tmp_path}: is a folder" in _one_line(err)


# The contract on real processes: exit status 2, exactly one line on stderr, no traceback.
_PROCESS_CASES = {
    "missing-file": (None, ["--data", "{tmp}/nowhere/ratings.dat"], "nowhere"),
    "binary-garbage": (b"\x00\xff\xfe\x80garbage\x00\x01", ["--data", "{file}"], "line 1: expected 4 fields"),
    "nan-rating": (b"1::2::nan::3\n", ["--data", "{file}"], "line 1: rating is not a finite number"),
    "truncated-line": (b"1::2::5::3\n1::2:", ["--data", "{file}"], "line 2: expected 4 fields"),
    "empty-file": (b"", ["--data", "{file}"], "leave no training users"),
    "bad-option": (b"1::2::5::3\n", ["--data", "{file}", "--clients-per-round", "0"], "--clients-per-round"),
    "dp-without-clip": (b"1::2::5::3\n", ["--data", "{file}", "--dp-noise", "1"], "dp_noise needs dp_clip"),
}


@pytest.mark.parametrize("case", list(_PROCESS_CASES))
@pytest.mark.slow
def test_cli_process_errors_are_one_line_without_outputs(case, tmp_path):
    content, args, expected = _PROCESS_CASES[case]
    file = tmp_path / "x" / "ratings.dat"
    if content is not None:
        file.parent.mkdir()
        file.write_bytes(content)
    argv = [a.format(tmp=tmp_path, file=file) for a in args]
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedrecon_fast",
            "train",
            "--rounds",
            "1",
            "--no-progress",
            "--out",
            str(out),
            "--save",
            str(tmp_path / "model"),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in lines[0]
    assert not out.exists() and not (tmp_path / "model").exists()


# ------------------------------------------------------------------ found by the larger campaigns


def test_hadamard_values_that_overflow_the_inverse_rotation_are_rejected():
    # Was: quantize/encode of [3e38, 0] with the rotation decoded to [inf, 0]: the encoder checked
    # the forward rotation only, and the inverse transform's float32 partial sums overflowed.
    x = np.array([3e38, 0.0], np.float32)
    for fn in (compression.quantize, compression.encode):
        with pytest.raises(ValueError, match="x is too large: its Hadamard rotation overflows float32"):
            fn(x, 1, hadamard=True)
    # A hand-made buffer with such a scale is refused by the decoder instead of decoding to inf.
    good = bytearray(compression.encode(np.zeros((1, 2), np.float32), 1, hadamard=True))
    body = bytes(good[:-4])
    scales = len(body) - 8 - 1  # one (lo, step) pair, then 1 payload byte (2 values x 1 bit)
    import struct
    import zlib

    body = body[:scales] + struct.pack("<ff", 2e38, 0.0) + body[scales + 8 :]
    crafted = body + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(ValueError, match="^buf: invalid scale of group 0 .*inverse Hadamard rotation"):
        compression.decode(crafted)


def test_dp_aggregate_that_overflows_raises():
    # Was: a tiny expected_weight turned a finite clipped sum into inf, returned silently.
    with pytest.raises(ValueError, match="expected_weight"):
        privacy.dp_sum(np.ones((1, 2), np.float32), clip=1.0, noise_multiplier=0.0, seed=0, expected_weight=1e-99)
    acc = privacy.DPGaussianSum(2, clip=1.0, noise_multiplier=0.0, seed=0, expected_weight=1e-99)
    acc.add(np.ones(2, np.float32))
    with pytest.raises(ValueError, match="expected_weight"):
        acc.result()
    assert np.isfinite(acc.result(np.float64)).all()  # float64 holds it


def test_capped_weights_with_a_tiny_cap_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(privacy.capped_weights([0, 4], 1e-308), [0.0, 1.0])


def test_client_config_int_fields_beyond_the_native_range_are_named():
    # Was: accepted, then pybind's "incompatible function arguments" when the round started.
    with pytest.raises(ValueError, match="update_steps_max must be <= "):
        ff.ClientConfig(update_steps_max=2**70)
    with pytest.raises(ValueError, match="batch_size must be <= 2147483647"):
        ff.ClientConfig(batch_size=2**31)


def test_client_step_with_any_client_id_costs_only_its_ratings(small):
    # Was: the client's ratings were put at row client_id of a CSR of client_id + 2 row pointers,
    # so a large id allocated O(client_id) memory (MemoryError for 2**40). The kernels now take
    # the id that keys the streams (data.stream_ids) and the CSR has one row.
    from types import SimpleNamespace

    from fedrecon_fast.functional import client_evaluate

    data, V = small
    model = {"item_factors": V}
    items, ratings = data.items[:3], data.ratings[:3]
    cfg = ff.ClientConfig(batch_size=1, reshuffle=True)
    big = ff.client_step(model, (items, ratings), cfg, client_id=2**62, seed=3)
    assert big.metrics["client_id"] == 2**62
    # Same bits as the client at row `key` of a CSR with that many rows (the old construction).
    key = 5000
    indptr = np.zeros(key + 2, np.int64)
    indptr[-1] = 3
    rows = SimpleNamespace(
        indptr=indptr, items=np.asarray(items), ratings=np.asarray(ratings), num_clients=key + 1, num_items=V.shape[0]
    )
    expected = kernels.client_updates(V, rows, [key], cfg, seed=3)
    got = ff.client_step(model, (items, ratings), cfg, client_id=key, seed=3)
    assert np.array_equal(got.update.values, expected.values) and np.array_equal(got.update.rows, expected.rows)
    ev = kernels.evaluate_users(V, rows, [key], cfg, seed=3, round=2**64 - 1)
    assert client_evaluate(model, (items, ratings), cfg, client_id=key, seed=3)["sq_err_sum"] == ev["sq_err_sum"][0]
    with pytest.raises(ValueError, match="client_id must be <= "):
        ff.client_step(model, (items, ratings), cfg, client_id=2**63)


def test_float_parameters_beyond_float32_are_named(small):
    # Was: a finite double such as 1e300 became inf in the native float32 parameter
    # (global_mean: every prediction inf/NaN, silently).
    data, V = small
    with pytest.raises(ValueError, match="global_mean must be <= "):
        kernels.evaluate_users(V, data, global_mean=1e300)
    with pytest.raises(ValueError, match="relevance_threshold must be >= "):
        kernels.evaluate_users(V, data, k=2, relevance_threshold=-1e39)
    with pytest.raises(ValueError, match="recon_lr must be <= "):
        ff.ClientConfig(recon_lr=1e300)
    with pytest.raises(ValueError, match="global_mean must be <= "):
        ff.GlobalModel(V, None, 1e39, np.arange(V.shape[0]))


def test_cli_recommend_reads_a_utf8_bom(saved_model, tmp_path, capsys):
    # Was: "\ufeff12,5" failed float(), so the first rating was taken for a header and dropped.
    model = ff.GlobalModel.load(saved_model)
    path = tmp_path / "r.csv"
    path.write_bytes(f"\ufeff{model.item_ids[0]},5\n".encode("utf-8"))
    code, out, err = _cli(["recommend", "--model", saved_model, "--ratings", path, "--json"], capsys)
    assert code == 0, err
    assert "with 1 known ratings" in out


def test_dp_expected_weight_whose_reciprocal_overflows_is_named():
    # Was: "the scale of the sum must be finite" (from the native kernel), naming nothing.
    with pytest.raises(ValueError, match="expected_weight is too small"):
        privacy.dp_sum(np.ones((1, 2), np.float32), clip=1.0, noise_multiplier=0.0, seed=0, expected_weight=2.2e-309)


def test_loader_accepts_a_file_cut_after_its_last_carriage_return(tmp_path):
    # Was: "malformed ratings in the block starting at line 1" (no line named) for a CRLF file
    # whose final "\n" is missing: the fast parser saw a line "\r", the diagnosis a blank one.
    path = tmp_path / "u.data"
    path.write_bytes(b"1\t2\t5\t7\r\n3\t4\t1\t8\r")
    data = ff.load_movielens(path)
    assert data.nnz == 2 and data.user_ids.tolist() == [1, 3]
    path.write_bytes(b"\r")
    assert ff.load_movielens(path).nnz == 0


def test_config_that_drops_every_client_is_rejected():
    with pytest.raises(ValueError, match="max_examples \\(1\\) < min_examples \\(2\\)"):
        ff.FedReconConfig(max_examples=1, min_examples=2)


def test_recommend_with_a_k_too_large_for_memory_is_a_named_error():
    # A padded (1, 2**31) top-k result would need 24 GiB: refused before allocating, not OOM-killed.
    data = ff.synthetic_ratings(num_users=5, num_items=30, min_ratings=5, seed=0)
    model = ff.GlobalModel.initialize(data.item_ids, ff.preset("paper", dim=4))
    with pytest.raises(ValueError, match="k is too large"):
        kernels.recommend_users(model.item_factors, data, [0], k=2**31)


def test_recommend_caps_k_at_the_catalogue_size():
    # Was: recommend(..., k=10**8) padded every user's result to 10**8 slots (1.2 GB).
    data = ff.synthetic_ratings(num_users=5, num_items=30, min_ratings=5, seed=0)
    model = ff.GlobalModel.initialize(data.item_ids, ff.preset("paper", dim=4))
    items, scores = model.recommend(data.item_ids[:3].tolist(), [4.0, 3.0, 5.0], k=10**8)
    assert items.shape == scores.shape == (model.num_items,)
    assert np.isnan(scores[-3:]).all() and (items[-3:] == -1).all()  # the 3 rated items are excluded
    assert np.array_equal(items[:5], model.recommend(data.item_ids[:3].tolist(), [4.0, 3.0, 5.0], k=5)[0])
    with pytest.raises(ValueError, match="k must be <="):
        model.recommend(data.item_ids[:3].tolist(), [4.0, 3.0, 5.0], k=10**30)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--threads", str(10**12)],
        ["train", "--quantize-bits", "8", "--quantize-threshold", str(10**30)],
        ["train", "--rank-k", str(10**24)],
        ["train", "--rounds", str(10**20)],
        ["train", "--dim", str(10**17)],
        ["train", "--clients-per-round", str(10**22)],
        ["train", "--eval-every", str(10**23)],
        ["train", "--checkpoint-every", str(10**21)],
        ["train", "--seed", str(2**64)],
        ["recommend", "--model", "m", "--ratings", "r", "--k", str(10**20)],
        ["paper", "--data", "d", "--threads", str(10**12)],
    ],
    ids=lambda argv: argv[-2],
)
def test_cli_integer_options_beyond_their_range_are_one_named_line(argv, capsys):
    # Was: --threads 10**12 or --quantize-threshold 10**30 printed a 2.7 kB pybind11 "incompatible
    # function arguments" dump; --rounds 10**20 trained forever; --rank-k failed after training.
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"argument {argv[-2]}: expected an integer <= " in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_threads", 10**12),
        ("quantize_threshold", 10**30),
        ("dim", 10**17),
        ("rounds", 10**20),
        ("clients_per_round", 10**22),
        ("eval_every", 10**23),
        ("max_examples", 10**20),
        ("min_examples", 10**20),
    ],
)
def test_config_integer_fields_beyond_the_native_range_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field} must be <= "):
        ff.FedReconConfig(**{field: value})


def test_kernel_integer_arguments_beyond_the_native_range_are_named(small):
    data, V = small
    with pytest.raises(ValueError, match="num_threads must be <= 2147483647"):
        kernels.train_round(V, data, num_threads=10**12)
    with pytest.raises(ValueError, match="threshold must be <= "):
        ff.UpdateCodec(bits=8, threshold=10**30)
    with pytest.raises(ValueError, match="k must be <= "):
        kernels.evaluate_users(V, data, k=10**30)
    with pytest.raises(ValueError, match="num_threads must be <= "):
        compression.quantize(np.zeros(4, np.float32), bits=8, num_threads=10**12)
    with pytest.raises(ValueError, match="num_threads must be <= "):
        aggregation.weighted_mean(np.zeros((2, 3), np.float32), [1.0, 1.0], num_threads=10**12)


@pytest.mark.parametrize("name", ["adam", "yogi", "adagrad"])
def test_second_moment_overflow_is_a_floating_point_error(name):
    # Was: RuntimeWarning "overflow encountered in square" and an infinite second moment that
    # silently froze the affected parameters (every later step divides by inf).
    from fedrecon_fast.optimizers import make_optimizer

    opt = make_optimizer(name)
    params = {"item_factors": np.zeros(3, np.float32)}
    state = opt.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FloatingPointError, match=f"{name}: the squared update overflows float32"):
            opt.apply(params, {"item_factors": np.array([1e20, 0, 0], np.float32)}, state)


def test_client_data_with_one_stray_huge_item_index_does_not_allocate_a_catalogue():
    # Was: ClientData([0, 1], [2**31 - 1], [5.0]) built item_ids = arange(2**31) (16 GB): the
    # fuzzer's process was killed by the OOM killer.
    with pytest.raises(ValueError, match="items: the largest index 2147483646 implies"):
        ff.ClientData([0, 1], [2**31 - 2], [5.0])
    data = ff.ClientData.from_coo([0], [2**31 - 2], [5.0])  # ids of any size are remapped
    assert data.num_items == 1 and data.item_ids.tolist() == [2**31 - 2]


def test_reduce_updates_num_items_is_bounded_by_int32_rows():
    with pytest.raises(ValueError, match="num_items must be <= 2147483647"):
        kernels.reduce_updates([], np.zeros((0, 2)), [0, 0], [1.0], num_items=2**31)


def test_weights_whose_sum_overflows_are_an_error_not_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="weights must have a finite sum"):
            aggregation.weighted_mean(np.ones((2, 2), np.float32), [1e308, 1e308])


def test_cli_recommend_item_id_beyond_64_bits_names_file_and_line(saved_model, tmp_path, capsys):
    # Was: "items must hold integer item ids; got dtype object", naming neither file nor line.
    path = tmp_path / "r.csv"
    path.write_text("item,rating\n99999999999999999999,1\n")
    code, _, err = _cli(["recommend", "--model", saved_model, "--ratings", path], capsys)
    assert code == 2 and f"{path}:2: item id 99999999999999999999 is out of range" in _one_line(err)
    # With --ignore-unknown it is dropped like any id the model does not know (found by the
    # random fuzz campaign: the CLI refused a file the flag should accept).
    model = ff.GlobalModel.load(saved_model)
    path.write_text(f"item,rating\n99999999999999999999,1\n{model.item_ids[0]},5\n")
    code, out, err = _cli(
        ["recommend", "--model", saved_model, "--ratings", path, "--ignore-unknown", "--json"], capsys
    )
    assert code == 0, err
    assert "with 1 known ratings" in out


def test_reduce_updates_weights_whose_sum_overflows():
    # Was: total inf and a delta of zeros, returned silently.
    with pytest.raises(ValueError, match="weights must have a finite sum"):
        kernels.reduce_updates([0, 1], np.ones((2, 2), np.float32), [0, 1, 2], [1e308, 1e308], num_items=2)


def test_encoded_size_of_a_sparse_table_encode_sparse_would_refuse():
    with pytest.raises(ValueError, match="num_rows"):
        compression.encoded_size((2**56, 3), 8, sparse_rows=0)


def test_reduce_updates_weights_with_a_subnormal_sum():
    # Was: 1 / sum overflowed and the "mean" was inf; server_step then reported a diverged model.
    with pytest.raises(ValueError, match="weights must have a normal sum"):
        kernels.reduce_updates([0], np.ones((1, 2), np.float32), [0, 1], [2.2e-309], num_items=2)


def test_shapes_whose_nonzero_entries_overflow_are_invalid():
    # Was: an empty (0, 2**40, 2**40) shape passed the wire format's checks and decode then
    # failed in NumPy ("array is too big").
    with pytest.raises(ValueError, match="shape is too large"):
        compression.encoded_size((0, 2**40, 2**40), 8)


def test_apply_lr_that_rounds_to_zero_in_float32_is_named():
    # Was: "the in-place step's lr must be finite and > 0" from the native core for 5e-324
    # (positive as a double, 0 as the float32 the step uses), naming no argument.
    data = ff.synthetic_ratings(num_users=5, num_items=30, min_ratings=5, seed=0)
    V = np.zeros((data.num_items, 2), np.float32)
    with pytest.raises(ValueError, match="apply_lr must be at least the smallest float32"):
        kernels.train_round(V, data, [0], apply_lr=5e-324)
    with pytest.raises(ValueError, match="apply_lr must be a finite float32 > 0"):
        _core.train_round(
            V,
            None,
            0.0,
            data.indptr,
            data.items,
            data.ratings,
            np.array([0]),
            client_config(ff.ClientConfig()),
            0,
            0,
            1,
            apply_lr=5e-324,
        )
