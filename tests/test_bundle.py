"""The on-disk format of models (and the checks checkpoints share): every byte verified, a strict
schema, bounded reads, regular files only. Every failure is a ValueError naming the file.

Most tests find the folder's JSON or files by content rather than by name, so that they also
show what the format before the manifest (model.json + model.npz) let through."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fedrecon_fast as ff


def _model(biases=True, items=6, dim=2, config=True):
    cfg = ff.preset("paper", dim=dim, biases=biases)
    model = ff.GlobalModel.initialize(np.arange(100, 100 + items), cfg, global_mean=3.5)
    if not config:
        model.config = None
    return model


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _json_file(folder: Path, key: str) -> Path:
    """The file of ``folder`` whose JSON text holds ``key`` (the manifest, or model.json)."""
    for p in _files(folder):
        if f'"{key}"'.encode() in p.read_bytes():
            return p
    raise AssertionError(f"no file in {folder} mentions {key}")


def _edit_number(path: Path, key: str, new: str) -> None:
    text = path.read_bytes()
    edited, n = re.subn(rb'("' + key.encode() + rb'":\s*)(-?[0-9.eE+-]+)', rb"\g<1>" + new.encode(), text)
    assert n == 1 and edited != text
    path.write_bytes(edited)


def _same(a: ff.GlobalModel, b: ff.GlobalModel) -> bool:
    return (
        np.array_equal(a.item_factors, b.item_factors)
        and np.array_equal(a.item_ids, b.item_ids)
        and a.global_mean == b.global_mean
        and a.config == b.config
        and (a.item_bias is None) == (b.item_bias is None)
        and (a.item_bias is None or np.array_equal(a.item_bias, b.item_bias))
    )


def test_round_trip_keeps_every_field(tmp_path):
    model = _model()
    model.user_default = np.array([0.25, -0.5], np.float32)
    model.config = model.config.replace(learn_user_default=True)
    model.user_bias_default = 0.125
    back = ff.GlobalModel.load(model.save(tmp_path / "m"))
    assert _same(back, model)
    assert np.array_equal(back.user_default, model.user_default) and back.user_bias_default == 0.125
    assert back.item_factors.flags.writeable and back.item_factors.flags.c_contiguous


def test_an_edited_global_mean_is_detected(tmp_path):
    # Was: "global_mean": 3.5 -> 4.5 in model.json loaded silently and shifted every score by 1.
    path = _model().save(tmp_path / "m")
    _edit_number(_json_file(path, "global_mean"), "global_mean", "4.5")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ff.GlobalModel.load(path)


def test_every_bit_flip_of_every_byte_is_detected(tmp_path):
    # Was: 417 of 10,224 single-bit flips of model.json loaded with different content, and
    # 3,180 raised KeyError/TypeError/RecursionError instead of a ValueError.
    path = _model(items=3).save(tmp_path / "m")
    original = ff.GlobalModel.load(path)
    flips = 0
    for file in _files(path):
        blob = file.read_bytes()
        for i in range(len(blob)):
            bit = 1 << (i % 8)  # each byte once, every bit position across neighbours
            file.write_bytes(blob[:i] + bytes([blob[i] ^ bit]) + blob[i + 1 :])
            try:
                loaded = ff.GlobalModel.load(path)
            except ValueError:
                flips += 1
                continue
            raise AssertionError(
                f"flip of bit {bit} of byte {i} of {file.name} loaded silently "
                f"({'same' if _same(loaded, original) else 'different'} content)"
            )
        file.write_bytes(blob)
    assert flips == sum(p.stat().st_size for p in _files(path)) > 1000
    assert _same(ff.GlobalModel.load(path), original)


@pytest.mark.parametrize(
    "damage",
    [
        "truncate",
        "append",
        "extra-file",
        "missing-file",
        "directory",
        "not-a-manifest",
        "other-format",
        "newer-version",
    ],
)
def test_damaged_files_are_value_errors_naming_the_file(tmp_path, damage):
    from fedrecon_fast import _bundle

    path = _model().save(tmp_path / "m")
    array_file = path / "item_factors.npy"
    manifest = path / _bundle.MANIFEST
    expected = array_file
    if damage == "truncate":
        array_file.write_bytes(array_file.read_bytes()[:-4])
    elif damage == "append":
        array_file.write_bytes(array_file.read_bytes() + b"\0")
    elif damage == "extra-file":
        (path / "notes.txt").write_text("x")
        expected = path
    elif damage == "missing-file":
        array_file.unlink()
    elif damage == "directory":
        array_file.unlink()
        array_file.mkdir()
    else:
        expected = manifest
        if damage == "not-a-manifest":
            manifest.write_text("{}")
        else:
            body = json.loads(manifest.read_bytes().split(b"\n")[0])
            body.update(
                {"other-format": {"format": "fedrecon_fast.checkpoint"}, "newer-version": {"version": 3}}[damage]
            )
            line = _bundle._canonical(body)
            import hashlib

            manifest.write_bytes(line + b"\nsha256 " + hashlib.sha256(line).hexdigest().encode() + b"\n")
    with pytest.raises(ValueError, match=re.escape(str(expected))) as info:
        ff.GlobalModel.load(path)
    if damage == "newer-version":
        assert "upgrade fedrecon_fast" in str(info.value)


def _forge(path: Path, change) -> None:
    """Rewrite the manifest with ``change(body)`` applied and valid digests: what a tool that
    understands the format could write. Only the schema stands between it and the model."""
    import hashlib

    from fedrecon_fast import _bundle

    manifest = path / _bundle.MANIFEST
    body = json.loads(manifest.read_bytes().split(b"\n")[0])
    change(body)
    for name in body["files"]:
        blob = (path / name).read_bytes()
        body["files"][name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    line = _bundle._canonical(body)
    manifest.write_bytes(line + b"\nsha256 " + hashlib.sha256(line).hexdigest().encode() + b"\n")


def _write_npy(path: Path, arr) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr), version=(1, 0))
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize(
    "case,message",
    [
        ("config-dim", "disagrees with the arrays"),
        ("duplicate-ids", "duplicate ids"),
        ("nan-factors", "NaN or infinite"),
        ("wrong-shape", "must be <f4 of shape"),
        ("bool-dim", "'dim' must be an integer"),
        ("huge-mean", "'global_mean' must be a finite number"),
        ("unknown-field", "unknown \\['colour'\\]"),
        ("bad-config", "'config' is invalid"),
        ("int-dtype", "must be <f4"),
    ],
)
def test_schema_violations_with_valid_digests_are_named(tmp_path, case, message):
    path = _model().save(tmp_path / "m")
    meta = lambda body: body["meta"]  # noqa: E731
    if case == "config-dim":
        _forge(path, lambda b: meta(b)["config"].update(dim=3))
    elif case == "duplicate-ids":
        _write_npy(path / "item_ids.npy", np.array([100, 101, 102, 103, 104, 100], np.int64))
        _forge(path, lambda b: None)
    elif case == "nan-factors":
        V = np.zeros((6, 2), np.float32)
        V[1, 1] = np.nan
        _write_npy(path / "item_factors.npy", V)
        _forge(path, lambda b: None)
    elif case == "wrong-shape":
        _write_npy(path / "item_factors.npy", np.zeros((6, 3), np.float32))
        _forge(path, lambda b: b["arrays"]["item_factors"].update(shape=[6, 3]))
    elif case == "bool-dim":
        _forge(path, lambda b: meta(b).update(dim=True))
    elif case == "huge-mean":
        _forge(path, lambda b: meta(b).update(global_mean=1e300))
    elif case == "unknown-field":
        _forge(path, lambda b: meta(b).update(colour="red"))
    elif case == "bad-config":
        _forge(path, lambda b: meta(b)["config"].update(client=[1, 2]))
    else:
        _write_npy(path / "item_factors.npy", np.zeros((6, 2), np.int64))
        _forge(path, lambda b: b["arrays"]["item_factors"].update(dtype="<i8"))
    with pytest.raises(ValueError, match=message):
        ff.GlobalModel.load(path)


def test_a_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path):
    path = _model().save(tmp_path / "m")
    data = np.load(path / "item_factors.npy").tobytes()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2000000000, 2)})
    (path / "item_factors.npy").write_bytes(header.getvalue() + data)
    _forge(path, lambda b: b["arrays"]["item_factors"].update(shape=[2000000000, 2]))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="item_factors.npy"):
            ff.GlobalModel.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def _version_1_model(folder: Path, arrays: dict, compression=zipfile.ZIP_STORED, meta=None) -> Path:
    """A model folder as fedrecon_fast 0.1 wrote it (model.json + np.savez's model.npz)."""
    folder.mkdir()
    V = arrays["item_factors"]
    meta = meta or {
        "format": "fedrecon_fast.model",
        "version": 1,
        "num_items": V.shape[0],
        "dim": V.shape[1],
        "biases": False,
        "global_mean": 0.0,
        "user_bias_default": 0.0,
        "config": None,
    }
    (folder / "model.json").write_text(json.dumps(meta, indent=2))
    with zipfile.ZipFile(folder / "model.npz", "w", compression=compression) as z:
        for name, arr in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, version=(1, 0))
    return folder


def test_version_1_models_still_load_with_their_schema_checked(tmp_path):
    V = np.arange(8, dtype=np.float32).reshape(4, 2)
    old = _version_1_model(tmp_path / "old", {"item_factors": V, "item_ids": np.arange(4, dtype=np.int64)})
    model = ff.GlobalModel.load(old)
    assert np.array_equal(model.item_factors, V) and model.config is None
    model.save(tmp_path / "new")  # converted: now every byte is covered
    assert (tmp_path / "new" / "manifest").is_file()
    bad = _version_1_model(tmp_path / "bad", {"item_factors": V, "item_ids": np.array([1, 1, 2, 3])})
    with pytest.raises(ValueError, match="duplicate ids"):
        ff.GlobalModel.load(bad)


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, read in chunks (the bomb is compressed without holding it in memory)."""

    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def test_a_decompression_bomb_is_refused_unread(tmp_path):
    # Was: a small model.npz that decompresses to gigabytes took all of it before failing.
    folder = tmp_path / "bomb"
    folder.mkdir()
    rows = 2**23  # 64 MiB of float32 zeros, a few dozen KiB compressed
    meta = {
        "format": "fedrecon_fast.model",
        "version": 1,
        "num_items": rows,
        "dim": 2,
        "biases": False,
        "global_mean": 0.0,
        "user_bias_default": 0.0,
        "config": None,
    }
    (folder / "model.json").write_text(json.dumps(meta))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (rows, 2)})
    with zipfile.ZipFile(folder / "model.npz", "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("item_factors.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            zeros = _Zeros(rows * 8)
            while chunk := zeros.read(1 << 20):
                member.write(chunk)
        z.writestr("item_ids.npy", b"")
    assert (folder / "model.npz").stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(Exception) as info:
            ff.GlobalModel.load(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated"
    assert info.type is ValueError and "model.npz" in str(info.value) and "compressed" in str(info.value)


def _load_in_subprocess(path: Path, timeout=60) -> subprocess.CompletedProcess:
    """Load in a child process with a time limit and a 4 GiB address-space limit (a reader that
    follows /dev/zero or blocks on a FIFO must fail the test, not hang or exhaust the machine)."""
    code = (
        "import resource, sys\n"
        "vsize = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) << 10\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vsize + (4 << 30),) * 2)  # 4 GiB more, even under ASan\n"
        "import fedrecon_fast as ff\n"
        "try:\n    ff.GlobalModel.load(sys.argv[1])\n"
        "except ValueError as e:\n    print('ValueError:', e); sys.exit(2)\n"
    )
    try:
        return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"loading {path} hung for {timeout} s") from None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs FIFOs, /dev/zero, /proc (Linux)")
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
@pytest.mark.parametrize("which", ["json", "array"])
def test_fifos_and_devices_are_refused_without_reading(tmp_path, kind, which):
    # Was: a FIFO made the load hang forever; a symlink to /dev/zero read until memory ran out.
    path = _model().save(tmp_path / "m")
    target = (
        _json_file(path, "global_mean")
        if which == "json"
        else next(p for p in _files(path) if p.suffix in (".npy", ".npz"))
    )
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    else:
        os.symlink("/dev/zero", target)
    proc = _load_in_subprocess(path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(target) in proc.stdout and ("regular file" in proc.stdout or "symbolic link" in proc.stdout)


def test_cli_recommend_with_a_corrupted_model_exits_2_naming_the_file(tmp_path):
    path = _model().save(tmp_path / "m")
    _edit_number(_json_file(path, "global_mean"), "global_mean", "9.5")
    (tmp_path / "r.csv").write_text("100,5\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedrecon_fast",
            "recommend",
            "--model",
            str(path),
            "--ratings",
            str(tmp_path / "r.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_saving_a_model_that_would_not_load_is_refused_before_writing(tmp_path):
    model = _model()
    model.item_factors[0, 0] = np.nan  # e.g. training diverged in place
    with pytest.raises(ValueError, match="NaN"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="item_ids must be unique"):
        ff.GlobalModel(np.zeros((2, 2)), None, 0.0, [7, 7])
