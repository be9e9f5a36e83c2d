"""Atomic replacement of folders (--save, --out, checkpoints): a process killed at any rename or
unlink leaves the old or the new version, complete, and the next run cleans up after it; OS
errors name the path."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import checkpoint

# ------------------------------------------------------------------ kill injection with strace

_SYSCALLS = ("rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir")
_MARKER = "/nonexistent-fedrecon-marker"  # an rmdir that fails: where the traced part starts


def _strace_works() -> str | None:
    """None when strace can trace here, else why not (the skip reason)."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install strace; .ci/run installs it where it can)"
    probe = subprocess.run(
        ["strace", "-qq", "-o", os.devnull, sys.executable, "-c", "pass"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"strace cannot trace in this environment: {probe.stderr.strip()[:200]}"
    return None


_NO_STRACE = _strace_works()
needs_strace = pytest.mark.skipif(_NO_STRACE is not None, reason=str(_NO_STRACE))

_PRELUDE = f"""
import os, sys
def start():
    try:
        os.rmdir({_MARKER!r})
    except OSError:
        pass
"""


def _env(tmp_path: Path) -> dict:
    env = dict(
        os.environ,
        PYTHONDONTWRITEBYTECODE="1",
        MPLCONFIGDIR=str(tmp_path / "mpl"),
        MPLBACKEND="Agg",
        OPENBLAS_NUM_THREADS="1",
    )
    return env


def _calls_after_marker(script: str, args: list, env: dict) -> list[tuple[str, int]]:
    """(syscall, its ordinal among the process's calls of that syscall) of every rename, unlink
    and rmdir the script makes after its start marker: the places to inject a kill."""
    log = Path(env["MPLCONFIGDIR"]).parent / "strace.log"
    subprocess.run(
        [
            "strace",
            "-qq",
            "-o",
            str(log),
            "-e",
            "trace=" + ",".join(_SYSCALLS),
            sys.executable,
            "-c",
            _PRELUDE + script,
            *map(str, args),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    counts: dict[str, int] = {}
    calls, started = [], False
    for line in log.read_text().splitlines():
        m = re.match(r"(\w+)\(", line)
        if not m or m[1] not in _SYSCALLS:
            continue
        counts[m[1]] = counts.get(m[1], 0) + 1
        if _MARKER in line:
            started = True
        elif started:
            calls.append((m[1], counts[m[1]]))
    return calls


def _run(script: str, args: list, env: dict) -> None:
    subprocess.run([sys.executable, "-c", _PRELUDE + script, *map(str, args)], env=env, check=True, capture_output=True)


def _killed_at(script: str, args: list, env: dict, call: tuple[str, int]) -> None:
    """Run the script, SIGKILLed on entry to the given call (before it takes effect)."""
    name, n = call
    proc = subprocess.run(
        [
            "strace",
            "-qq",
            "-o",
            os.devnull,
            "-e",
            f"inject={name}:signal=KILL:when={n}",
            sys.executable,
            "-c",
            _PRELUDE + script,
            *map(str, args),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL or "Killed" in proc.stderr or proc.returncode == 137, (
        f"not killed at {call}: {proc.returncode} {proc.stderr[-500:]}"
    )


_SAVE_MODEL = """
import numpy as np
from fedrecon_fast import GlobalModel, preset
model = GlobalModel.initialize(np.arange(5), preset("paper", dim=2))
model.item_factors[:] = float(sys.argv[2])
start()
model.save(sys.argv[1])
"""


def _only(parent: Path, *names: str) -> None:
    assert sorted(p.name for p in parent.iterdir()) == sorted(names), "leftovers after recovery"


@needs_strace
@pytest.mark.slow
def test_a_kill_at_any_rename_or_unlink_of_a_model_save_leaves_a_complete_model(tmp_path):
    # Was: a kill at the first rename left no model at all (the new one only in a hidden
    # temporary folder), and Ctrl-C at the wrong moment deleted both versions.
    env = _env(tmp_path)
    parent = tmp_path / "models"
    path = parent / "m"
    _run(_SAVE_MODEL, [tmp_path / "dry" / "m", 1.0], env)
    calls = _calls_after_marker(_SAVE_MODEL, [tmp_path / "dry" / "m", 2.0], env)
    assert len(calls) >= 6, calls  # 3 renames, then the old version's files and folder deleted
    seen = set()
    for call in calls:
        shutil.rmtree(parent, ignore_errors=True)
        _run(_SAVE_MODEL, [path, 1.0], env)
        _killed_at(_SAVE_MODEL, [path, 2.0], env, call)
        model = ff.GlobalModel.load(path)  # recovers an interrupted swap first
        values = set(np.unique(model.item_factors).tolist())
        assert values in ({1.0}, {2.0}), (call, values)
        seen.add(values.pop())
        _only(parent, "m")
        ff.GlobalModel.initialize(np.arange(5), ff.preset("paper", dim=2)).save(path)  # saves work again
    assert seen == {1.0, 2.0}, "the kills should land both before and after the swap"


_OUT = """
from pathlib import Path
from fedrecon_fast.cli import _write_atomically
run = sys.argv[2]
def write(folder):  # as the CLI's --out writes a run's metrics and plot
    for name in ("learning_curve.png", "metrics.csv", "metrics.json"):
        (folder / name).write_text(f"{name} of run {run}")
start()
_write_atomically(Path(sys.argv[1]), write)
"""


def _ratings_file(tmp_path: Path) -> Path:
    path = tmp_path / "ratings.dat"
    rng = np.random.default_rng(0)
    path.write_text(
        "".join(
            f"{u}::{i}::{rng.integers(1, 6)}::{k}\n"
            for k, (u, i) in enumerate((u, i) for u in range(1, 31) for i in range(1, 9))
        )
    )
    return path


@needs_strace
@pytest.mark.slow
def test_a_kill_at_any_rename_or_unlink_of_out_leaves_one_complete_run(tmp_path):
    # Was: --out moved its files one at a time: a kill left a new PNG beside old metrics.
    env = _env(tmp_path)
    out = tmp_path / "results" / "out"
    old = tmp_path / "old"  # an earlier run's --out, with a file of the user's
    _run(_OUT, [old, 1], env)
    (old / "notes.txt").write_text("mine")
    shutil.copytree(old, tmp_path / "dry")
    calls = _calls_after_marker(_OUT, [tmp_path / "dry", 2], env)
    assert len(calls) >= 7, calls
    runs = set()
    for call in calls:
        shutil.rmtree(out.parent, ignore_errors=True)
        shutil.copytree(old, out)
        _killed_at(_OUT, [out, 2], env, call)
        from fedrecon_fast import _folders

        _folders.recover(out)  # what the next run does first
        _only(out.parent, "out")
        assert (out / "notes.txt").read_text() == "mine"
        contents = {p.read_text().split(" of run ")[-1] for p in out.iterdir() if p.name != "notes.txt"}
        assert len(contents) == 1 and len(list(out.iterdir())) == 4, (call, contents)  # one run's outputs
        runs |= contents
    assert runs == {"1", "2"}


_CHECKPOINT = """
from fedrecon_fast import FedRecon, synthetic_ratings
data = synthetic_ratings(num_users=30, num_items=8, min_ratings=3, mean_ratings=4, seed=3)
trainer = FedRecon.from_checkpoint(sys.argv[1])
start()
trainer.fit(data, rounds=1, checkpoint_dir=sys.argv[1], checkpoint_every=1)
"""


@needs_strace
@pytest.mark.slow
def test_a_kill_at_any_rename_or_unlink_of_a_checkpoint_leaves_verifying_checkpoints(tmp_path):
    env = _env(tmp_path)
    data = ff.synthetic_ratings(num_users=30, num_items=8, min_ratings=3, mean_ratings=4, seed=3)
    cfg = ff.preset("paper", rounds=10, clients_per_round=5, dim=2)

    def two_checkpoints(directory):
        shutil.rmtree(directory, ignore_errors=True)
        ff.FedRecon(cfg).fit(data, rounds=2, checkpoint_dir=directory, checkpoint_every=1)

    two_checkpoints(tmp_path / "dry")
    calls = _calls_after_marker(_CHECKPOINT, [tmp_path / "dry"], env)
    directory = tmp_path / "ckpt"
    rounds = set()
    for call in calls:
        two_checkpoints(directory)
        _killed_at(_CHECKPOINT, [directory], env, call)
        newest = checkpoint.latest(directory)  # recovers, then verifies
        rounds.add(newest["round"])
        for path in checkpoint.list_checkpoints(directory):
            checkpoint.load(path)  # every checkpoint left under its name is complete
        _only(directory, ".lock", *(p.name for p in checkpoint.list_checkpoints(directory)))
    assert rounds == {2, 3}


# ------------------------------------------------------------------ without strace


def test_recovery_finishes_a_swap_and_removes_dead_writers_temporaries(tmp_path):
    from fedrecon_fast import _folders

    model = ff.GlobalModel.initialize(np.arange(4), ff.preset("paper", dim=2))
    path = model.save(tmp_path / "m")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    # As a writer killed between "m -> old" and "new -> m" leaves it, plus an unfinished write.
    os.rename(path, tmp_path / f".m.new-{dead}-0123abcd")
    (tmp_path / f".m.tmp-{dead}-89abcdef").mkdir()
    (tmp_path / f".m.tmp-{os.getpid()}-00000000").mkdir()  # a live writer's (this process): kept
    assert np.array_equal(ff.GlobalModel.load(path).item_factors, model.item_factors)
    _only(tmp_path, "m", f".m.tmp-{os.getpid()}-00000000")
    _folders.replace_folder(tmp_path / "x", lambda folder: (folder / "f").write_text("1"))
    assert (tmp_path / "x" / "f").read_text() == "1"


def test_an_interrupted_write_leaves_the_old_version(tmp_path):
    from fedrecon_fast import _folders

    _folders.replace_folder(tmp_path / "d", lambda folder: (folder / "a").write_text("old"))

    def interrupted(folder):
        (folder / "a").write_text("new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _folders.replace_folder(tmp_path / "d", interrupted)
    assert (tmp_path / "d" / "a").read_text() == "old"
    _only(tmp_path, "d")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        _folders.replace_folder(tmp_path / "file", lambda folder: None)


def _run_with_file_size_limit(argv: list, limit: int) -> subprocess.CompletedProcess:
    def limit_writes():  # writes beyond `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "fedrecon_fast", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_writes,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
    )


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE (POSIX)")
@pytest.mark.parametrize("option", ["--save", "--out", "--checkpoint-dir"])
@pytest.mark.slow
def test_a_write_that_fails_names_the_path_and_keeps_the_old_version(tmp_path, option):
    # Was: disk full and permission errors did not name the path.
    ratings = _ratings_file(tmp_path)
    target = tmp_path / "target"
    base = [
        "train",
        "--data",
        ratings,
        "--rounds",
        "2",
        "--clients-per-round",
        "3",
        "--dim",
        "64",
        "--no-progress",
        "--threads",
        "1",
    ]
    first = subprocess.run(
        [sys.executable, "-m", "fedrecon_fast", *map(str, base), option, target],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    snapshot = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file() and p.name != ".lock"}
    again = ["--resume", "--rounds", "3"] if option == "--checkpoint-dir" else []
    proc = _run_with_file_size_limit([*base, option, target, *again], 1024)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "File too large" in lines[0], proc.stderr
    assert {
        p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file() and p.name != ".lock"
    } == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.dat", "target"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_a_folder_without_write_permission_is_named(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        model = ff.GlobalModel.initialize(np.arange(4), ff.preset("paper", dim=2))
        with pytest.raises(PermissionError, match=re.escape(str(locked / "m"))):
            model.save(locked / "m")
    finally:
        locked.chmod(0o700)
