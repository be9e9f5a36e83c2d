"""Runtime dispatch: every compiled SIMD target this CPU runs gives the reference's results, the
import picks the widest one, and a default build runs on an old x86-64 CPU (under QEMU)."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import _native

HERE = Path(__file__).resolve().parent

# A child process: one round and one reconstruction on the forced target, against the NumPy
# reference, with 1 and 3 threads; prints what it computed as JSON.
CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import reference as ref
import fedrecon_fast as ff
from fedrecon_fast._native import core
data = ff.synthetic_ratings(num_users=60, num_items=40, seed=2).prepare(max_examples=60, shuffle_seed=2)
cfg = ff.ClientConfig(recon_epochs=3, recon_steps_max=12, update_steps_max=9, client_lr=0.2)
V = np.random.default_rng(2).normal(0, 0.3, (data.num_items, 13)).astype(np.float32)
clients = ff.sample_clients(data.num_clients, 25, 3, 4)
one = ff.train_round(V, data, clients, cfg, seed=3, round=4, num_threads=1, global_mean=3.0)
three = ff.train_round(V, data, clients, cfg, seed=3, round=4, num_threads=3, global_mean=3.0)
delta, _, _, _ = ref.train_round(V, data, clients, cfg, seed=3, round=4, global_mean=3.0)
users = ff.reconstruct_users(V, data, clients, cfg, seed=3, round=4, global_mean=3.0)[0]
print(json.dumps({"target": core.TARGET, "threads_equal": bool(np.array_equal(one.delta, three.delta)),
                  "max_ref_error": float(np.abs(one.delta - delta).max()),
                  "delta": one.delta.ravel().tolist(), "users": users.ravel().tolist()}))
"""


def run_child(target: str, prefix=()) -> dict:
    env = dict(os.environ, FEDRECON_TARGET=target)
    out = subprocess.run(
        [*prefix, sys.executable, "-c", CHILD, str(HERE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_widest_runnable_target_is_in_use(capsys):
    assert _native.core.TARGET == _native._runnable[0]
    ff.show_config()
    text = capsys.readouterr().out
    assert f"in use:             {_native.core.TARGET}" in text
    assert "targets compiled:" in text and "CPU features found:" in text


@pytest.mark.slow
def test_every_runnable_target_matches_the_reference():
    results = {t: run_child(t) for t in _native._runnable}
    for target, r in results.items():
        assert r["target"] == target
        assert r["threads_equal"], target  # thread counts never change a result
        assert r["max_ref_error"] < 1e-5, target
    # Between targets only float32 rounding may differ (documented in fedrecon_fast._native).
    base = results[_native._runnable[-1]]
    for target, r in results.items():
        np.testing.assert_allclose(r["delta"], base["delta"], rtol=1e-4, atol=1e-6, err_msg=target)
        np.testing.assert_allclose(r["users"], base["users"], rtol=1e-4, atol=1e-6, err_msg=target)


def test_an_unknown_or_unrunnable_target_is_refused():
    env = dict(os.environ, FEDRECON_TARGET="sse9")
    out = subprocess.run(
        [sys.executable, "-c", "import fedrecon_fast"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "FEDRECON_TARGET='sse9' is not a compiled target this CPU runs" in out.stderr
    assert "compiled: [" in out.stderr


QEMU = shutil.which("qemu-x86_64")
# A partial build (tools/sanitize.sh instruments one target) may hold no baseline module.
HAS_BASELINE = "baseline" in _native.compiled_targets()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the QEMU check is for x86-64 builds")
@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (Debian: qemu-user) is not installed")
@pytest.mark.skipif(not HAS_BASELINE, reason="this build holds no baseline module (FEDRECON_TARGETS)")
@pytest.mark.slow
def test_the_default_build_runs_on_an_old_cpu():
    # Westmere (2010): SSE4.2, no AVX. The import must pick the baseline module and compute the
    # reference's round, with no illegal instruction on the way. (NumPy's OpenBLAS misreads
    # QEMU's emulated CPU and picks AVX kernels: OPENBLAS_CORETYPE keeps it on SSE ones.)
    env = dict(os.environ, OPENBLAS_CORETYPE="Nehalem")
    env.pop("FEDRECON_TARGET", None)
    code = CHILD.replace("sys.argv[1]", repr(str(HERE)))
    out = subprocess.run(
        [QEMU, "-cpu", "Westmere", sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["target"] == "baseline"
    assert r["threads_equal"] and r["max_ref_error"] < 1e-5


OBJDUMP = shutil.which("objdump")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 builds only")
@pytest.mark.skipif(OBJDUMP is None, reason="objdump (binutils) is not installed")
@pytest.mark.skipif(not HAS_BASELINE, reason="this build holds no baseline module (FEDRECON_TARGETS)")
@pytest.mark.slow
def test_the_baseline_module_holds_no_avx_instructions():
    # Any ymm/zmm register in the baseline module's code would fault on an SSE-only CPU.
    import importlib

    path = importlib.import_module("fedrecon_fast._native._core_baseline").__file__
    asm = subprocess.run(
        [OBJDUMP, "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    wide = [line for line in asm.splitlines() if "%ymm" in line or "%zmm" in line]
    assert wide == [], wide[:5]
    if "avx512" in _native.compiled_targets():  # the check itself can see wide registers
        path = importlib.import_module("fedrecon_fast._native._core_avx512").__file__
        asm = subprocess.run(
            [OBJDUMP, "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True, timeout=300
        ).stdout
        assert "%zmm" in asm
