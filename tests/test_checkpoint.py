"""Checkpoints: a run killed at any moment and resumed ends bit-identical to an uninterrupted
run; corrupted checkpoints are rejected with a clear error and the previous one is used."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import checkpoint
from fedrecon_fast.baselines import FedAvg, fedavg_config
from fedrecon_fast.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def splits():
    data = ff.synthetic_ratings(num_users=300, num_items=200, seed=1).prepare(max_examples=300, shuffle_seed=1)
    return tuple(data.subset(i) for i in ff.split_users(data.num_clients, seed=1))


RUNS = {
    "fedrecon-adam-biases-default": (
        ff.FedRecon,
        lambda: ff.preset("fast", server_optimizer="adam", server_lr=0.01, learn_user_default=True),
    ),
    "fedrecon-dp": (ff.FedRecon, lambda: ff.preset("paper", dp_clip=0.5, dp_noise=0.5, weighting="uniform")),
    "fedavg": (FedAvg, lambda: fedavg_config(client_lr=0.1)),
}


def _strip(history):
    return [{k: v for k, v in h.items() if k != "round_seconds"} for h in history]


def _small(make):
    return make().replace(rounds=30, clients_per_round=20, dim=8, eval_every=7)


@pytest.mark.parametrize("run", RUNS)
def test_resumed_run_equals_the_uninterrupted_run(splits, tmp_path, run):
    train, val, _ = splits
    cls, make = RUNS[run]
    cfg = _small(make)
    whole = cls(cfg).fit(train, val)
    cls(cfg).fit(train, val, rounds=13, checkpoint_dir=tmp_path, checkpoint_every=5)
    shutil.rmtree(tmp_path / "ckpt-00000013")  # as if killed before fit returned
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-00000010"]  # keep=2: 5 is gone
    resumed = cls.from_checkpoint(tmp_path, cfg.replace(num_threads=1))
    assert resumed.round == 10
    resumed.fit(train, val, rounds=cfg.rounds - resumed.round)
    assert np.array_equal(resumed.model.item_factors, whole.model.item_factors)
    assert _strip(resumed.history) == _strip(whole.history)
    assert resumed.aggregated_bits == whole.aggregated_bits
    if isinstance(whole, FedAvg):
        assert np.array_equal(resumed.users, whole.users)
    if whole.model.user_default is not None:
        assert np.array_equal(resumed.model.user_default, whole.model.user_default)
        assert resumed.model.user_bias_default == whole.model.user_bias_default


def _two_checkpoints(splits, directory):
    train, val, _ = splits
    cfg = _small(RUNS["fedrecon-adam-biases-default"][1])
    ff.FedRecon(cfg).fit(train, val, rounds=10, checkpoint_dir=directory, checkpoint_every=5)
    return cfg


def _meta_file(checkpoint_dir: Path) -> Path:
    """The file that holds a checkpoint's round (the manifest; trainer.json before it)."""
    return next(p for p in sorted(checkpoint_dir.rglob("*")) if p.is_file() and b'"round"' in p.read_bytes())


def _array_file(checkpoint_dir: Path) -> Path:
    return max((p for p in checkpoint_dir.rglob("*") if p.suffix in (".npy", ".npz")), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize(
    "damage", ["flip-byte", "truncate", "drop-file", "garbage-json", "edited-round", "directory", "legacy"]
)
def test_corrupted_newest_checkpoint_is_rejected_and_the_previous_one_used(splits, tmp_path, damage, caplog):
    cfg = _two_checkpoints(splits, tmp_path)
    newest = tmp_path / "ckpt-00000010"
    array_file, meta_file = _array_file(newest), _meta_file(newest)
    if damage == "flip-byte":
        blob = bytearray(array_file.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        array_file.write_bytes(bytes(blob))
    elif damage == "truncate":
        array_file.write_bytes(array_file.read_bytes()[:40])
    elif damage == "drop-file":
        array_file.unlink()
    elif damage == "garbage-json":
        meta_file.write_bytes(b"\x00\xff{not json")
    elif damage == "edited-round":
        # Was: an edited round resumed silently to a different result (trainer.json's checksums
        # covered every file but itself).
        meta_file.write_bytes(
            meta_file.read_bytes().replace(b'"round":10', b'"round":9').replace(b'"round": 10', b'"round": 9')
        )
    elif damage == "directory":
        array_file.unlink()
        array_file.mkdir()
    else:
        for p in list(newest.iterdir()):
            p.unlink()
        (newest / "trainer.json").write_text(json.dumps({"format": "fedrecon_fast.checkpoint", "version": 1}))
    with pytest.raises(CheckpointError, match="ckpt-00000010"):
        checkpoint.load(newest)
    trainer = ff.FedRecon.from_checkpoint(tmp_path, cfg)
    assert trainer.round == 5
    assert "skipping checkpoint" in caplog.text
    assert newest.exists()  # kept for inspection, never silently deleted


@pytest.mark.slow
def test_every_bit_flip_of_the_newest_checkpoint_falls_back(tmp_path):
    # Was: 662 of 1,500 bit flips of trainer.json resumed silently, 79 raised instead of falling back.
    train = ff.synthetic_ratings(num_users=30, num_items=6, min_ratings=3, mean_ratings=4, seed=3)
    cfg = ff.preset("paper", rounds=2, clients_per_round=5, dim=2, server_optimizer="momentum")
    ff.FedRecon(cfg).fit(train, rounds=2, checkpoint_dir=tmp_path, checkpoint_every=1)
    newest = tmp_path / "ckpt-00000002"
    files = sorted(p for p in newest.rglob("*") if p.is_file())
    flips = 0
    for file in files:
        blob = file.read_bytes()
        for i in range(len(blob)):
            file.write_bytes(blob[:i] + bytes([blob[i] ^ (1 << (i % 8))]) + blob[i + 1 :])
            with pytest.raises(CheckpointError):
                checkpoint.load(newest)
            flips += 1
            if i % 997 == 0:  # now and then the whole fallback, as resume runs it
                assert checkpoint.latest(tmp_path)["round"] == 1
        file.write_bytes(blob)
    assert flips > 2000
    assert checkpoint.latest(tmp_path)["round"] == 2


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the folder of a descriptor in /proc (Linux)")
def test_an_unreadable_newest_checkpoint_falls_back(splits, tmp_path, monkeypatch, caplog):
    # Was: an unreadable newest checkpoint stopped the run instead of falling back. (Permissions
    # do not stop root, so the refusal is injected at the open() of that checkpoint's files.)
    cfg = _two_checkpoints(splits, tmp_path)
    real_open = os.open

    def refusing_open(path, flags, mode=0o777, *, dir_fd=None):
        folder = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.path.dirname(str(path))
        if folder.endswith("ckpt-00000010"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(CheckpointError, match="ckpt-00000010.*Permission denied"):
        checkpoint.load(tmp_path / "ckpt-00000010")
    assert ff.FedRecon.from_checkpoint(tmp_path, cfg).round == 5
    assert "skipping checkpoint" in caplog.text


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs FIFOs, /dev/zero, /proc (Linux)")
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_fifo_or_device_in_the_newest_checkpoint_falls_back(splits, tmp_path, kind):
    # Was: a FIFO trainer.json made --resume hang forever; a symlink to /dev/zero read until
    # memory ran out.
    _two_checkpoints(splits, tmp_path)
    meta_file = _meta_file(tmp_path / "ckpt-00000010")
    meta_file.unlink()
    if kind == "fifo":
        os.mkfifo(meta_file)
    else:
        os.symlink("/dev/zero", meta_file)
    code = (
        "import resource, sys\n"
        "vsize = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) << 10\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vsize + (4 << 30),) * 2)  # 4 GiB more, even under ASan\n"
        "from fedrecon_fast import checkpoint\nprint(checkpoint.latest(sys.argv[1])['round'])\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("reading the checkpoint hung") from None
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["5"]


def test_no_valid_checkpoint_is_a_clear_error(splits, tmp_path):
    cfg = _two_checkpoints(splits, tmp_path)
    for path in checkpoint.list_checkpoints(tmp_path):
        (path / "trainer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        ff.FedRecon.from_checkpoint(tmp_path, cfg)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ff.FedRecon.from_checkpoint(tmp_path / "empty", cfg)
    # A half-written temporary directory (a crash mid-write) is never taken for a checkpoint.
    (tmp_path / ".ckpt-tmp-x").mkdir()
    assert checkpoint.list_checkpoints(tmp_path)[0].name == "ckpt-00000010"


def test_checkpoint_belongs_to_its_configuration_and_trainer(splits, tmp_path):
    cfg = _two_checkpoints(splits, tmp_path)
    with pytest.raises(CheckpointError, match="client"):
        ff.FedRecon.from_checkpoint(tmp_path, cfg.replace(client_lr=0.3))
    with pytest.raises(CheckpointError, match="FedRecon, not FedAvg"):
        FedAvg.from_checkpoint(tmp_path, None)
    assert ff.FedRecon.from_checkpoint(tmp_path, cfg.replace(rounds=99, num_threads=1)).round == 10


def test_divergence_keeps_the_last_good_checkpoint(splits, tmp_path):
    train, val, _ = splits
    cfg = ff.preset("paper", rounds=200, clients_per_round=20, dim=8, eval_every=0)
    trainer = ff.FedRecon(cfg).fit(train, rounds=4, checkpoint_dir=tmp_path, checkpoint_every=2)
    trainer.model.item_factors[0, 0] = np.inf  # the model breaks
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.fit(train, rounds=5, checkpoint_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="non-finite"):
        trainer.save_checkpoint(tmp_path)
    good = ff.FedRecon.from_checkpoint(tmp_path, cfg)
    assert good.round == 4 and np.isfinite(good.model.item_factors).all()


# ---------------------------------------------------------------------------------- command line

TIMING = {"train_seconds", "round_ms_median", "eval_seconds", "load_seconds"}
ARGS = ["train", "--rounds", "1500", "--checkpoint-every", "20", "--json", "--no-progress", "--threads", "2"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fedrecon_fast", *args], capture_output=True, text=True, **kw)


def _result(stdout: str) -> dict:
    out = json.loads(stdout.strip().splitlines()[-1])
    return {k: v for k, v in out.items() if k not in TIMING}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    done = _cli(*ARGS, "--checkpoint-dir", str(tmp_path_factory.mktemp("whole")))
    assert done.returncode == 0, done.stderr
    return _result(done.stdout)


@pytest.mark.parametrize("kill_after", [0, 1, 8])
@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_the_same_json(uninterrupted, tmp_path, kill_after):
    """Kill the run with SIGKILL once ``kill_after`` checkpoints exist (0: at start-up), then
    resume with the same command plus --resume."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedrecon_fast", *ARGS, "--checkpoint-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while (
        kill_after
        and len(checkpoint.list_checkpoints(tmp_path)) < min(kill_after, 2)
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.002)
    if kill_after > 2:  # let it run on a little past the second checkpoint
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The kill ended the run (it did not finish first), before the last round's checkpoint.
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed: it exited with {proc.returncode}"
    written = checkpoint.list_checkpoints(tmp_path)
    assert not written or written[0].name < f"ckpt-{int(ARGS[ARGS.index('--rounds') + 1]):08d}"
    resumed = _cli(*ARGS, "--checkpoint-dir", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _result(resumed.stdout) == uninterrupted


@pytest.mark.slow
def test_cli_checkpoint_misuse_is_a_one_line_error(tmp_path):
    bad = _cli("train", "--rounds", "3", "--resume")
    assert bad.returncode == 2 and "--resume needs --checkpoint-dir" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    ok = _cli("train", "--rounds", "3", "--no-progress", "--checkpoint-dir", str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    again = _cli("train", "--rounds", "3", "--no-progress", "--checkpoint-dir", str(tmp_path))
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    other = _cli("train", "--rounds", "3", "--no-progress", "--dim", "7", "--checkpoint-dir", str(tmp_path), "--resume")
    assert other.returncode == 2 and "different configuration" in other.stderr


def _wait_for_checkpoint(proc, directory, timeout=60):
    deadline = time.monotonic() + timeout
    while not checkpoint.list_checkpoints(directory) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before its first checkpoint"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
@pytest.mark.slow
def test_a_signal_finishes_the_round_checkpoints_and_resumes_exactly(uninterrupted, tmp_path, signum):
    # Was: SIGTERM, SIGINT and SIGHUP ended the run at once; the rounds since the last periodic
    # checkpoint were lost.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedrecon_fast", *ARGS, "--checkpoint-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_checkpoint(proc, tmp_path)
        time.sleep(0.05)  # into the rounds after the first periodic checkpoint
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    stopped = re.search(r"stopped by (\w+) after round (\d+); checkpoint of round \2", err)
    assert stopped and stopped[1] == signum.name, err
    assert checkpoint.list_checkpoints(tmp_path)[0].name == f"ckpt-{int(stopped[2]):08d}"
    resumed = _cli(*ARGS, "--checkpoint-dir", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _result(resumed.stdout) == uninterrupted


@pytest.mark.slow
def test_a_second_process_on_the_same_checkpoint_folder_is_refused(tmp_path):
    # Was: two processes given the same --checkpoint-dir raced (one died on a vanished folder).
    args = [*ARGS, "--checkpoint-dir", str(tmp_path)]
    args[args.index("1500")] = "1000000"  # the first run is still training when the second starts
    first = subprocess.Popen(
        [sys.executable, "-m", "fedrecon_fast", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_checkpoint(first, tmp_path)
        try:
            second = _cli(*args, "--resume", timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the second process trained into the same folder") from None
        assert second.returncode == 2, second.stderr
        assert f"checkpoint folder {tmp_path} is in use by another process (pid {first.pid})" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    # The lock dies with its process: the folder can be resumed at once.
    with checkpoint.locked(tmp_path):
        assert checkpoint.latest(tmp_path)["round"] > 0


def test_the_lock_refuses_another_thread_and_nests_in_its_own(tmp_path):
    from fedrecon_fast import _folders

    refused = []

    def other():
        try:
            with checkpoint.locked(tmp_path):
                pass
        except _folders.FolderLockedError as e:
            refused.append(str(e))

    with checkpoint.locked(tmp_path):
        with checkpoint.locked(tmp_path):  # the same thread (the CLI's lock around fit's)
            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
    assert refused and "another thread" in refused[0]
    other()
    assert len(refused) == 1  # free again once released
