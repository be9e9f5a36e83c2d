"""Kernels release the GIL and are re-entrant: concurrent calls from Python threads agree."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

import fedrecon_fast as ff
from fedrecon_fast import aggregation, compression, privacy


@pytest.fixture(scope="module")
def busy():
    """Calls of each kernel that compute for about a tenth of a second on one thread."""
    data = ff.synthetic_ratings(num_users=1000, num_items=500, seed=1)
    cfg = ff.preset("paper", dim=64)
    V = ff.GlobalModel.initialize(data.item_ids, cfg).item_factors
    everyone = np.arange(data.num_clients)
    ups = ff.client_updates(V, data, np.tile(everyone, 10), cfg.client, num_threads=1)
    x = np.random.default_rng(0).normal(size=(16000, 512)).astype(np.float32)
    return SimpleNamespace(
        data=data, client=cfg.client, V=V, ups=ups, x=x, cohort=lambda times: np.tile(everyone, times)
    )


GIL_CALLS = {
    "train_round": lambda b: ff.train_round(b.V, b.data, b.cohort(20), b.client, num_threads=1),
    "train_rounds": lambda b: ff.kernels.train_rounds(
        b.V.copy(), b.data, b.client, num_rounds=300, clients_per_round=200, num_threads=1
    ),
    "client_updates": lambda b: ff.client_updates(b.V, b.data, b.cohort(5), b.client, num_threads=1),
    "reduce_updates": lambda b: ff.kernels.reduce_updates(
        b.ups.rows, b.ups.values, b.ups.offsets, b.ups.weights, num_items=len(b.V), num_threads=1
    ),
    "reconstruct_users": lambda b: ff.reconstruct_users(b.V, b.data, b.cohort(60), b.client, num_threads=1),
    "evaluate_users": lambda b: ff.evaluate_users(b.V, b.data, b.cohort(10), b.client, k=10, num_threads=1),
    "infer_users": lambda b: ff.infer_users(b.V, b.data, b.cohort(60), b.client, num_threads=1),
    "recommend_users": lambda b: ff.recommend_users(b.V, b.data, b.cohort(10), b.client, k=10, num_threads=1),
    "quantize": lambda b: compression.quantize(b.x, 8, hadamard=True, num_threads=1),
    "weighted_mean": lambda b: aggregation.weighted_mean([b.x] * 40, num_threads=1),
    "dp_sum": lambda b: privacy.dp_sum([b.x] * 8, clip=1.0, noise_multiplier=1.0, seed=0, num_threads=1),
}


@pytest.mark.parametrize("name", list(GIL_CALLS))
@pytest.mark.slow
def test_a_python_thread_runs_while_a_kernel_computes(busy, name):
    """While one thread is inside a kernel, another keeps running Python: its longest pause
    during the call is a small part of the call (with the GIL held it would be all of it)."""
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(time.perf_counter())

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        while not ticks:
            time.sleep(0.001)
        start = time.perf_counter()
        GIL_CALLS[name](busy)
        end = time.perf_counter()
    finally:
        stop.set()
        ticker.join()
    inside = [t for t in ticks if start < t < end]
    longest_pause = float(np.diff([start, *inside, end]).max())
    assert end - start > 0.02, "the call is too short to tell"
    assert longest_pause < 0.5 * (end - start), (
        f"{name}: Python stood still for {longest_pause * 1e3:.0f} of the call's {(end - start) * 1e3:.0f} ms"
    )


def test_concurrent_calls_from_python_threads_match_serial_results():
    data = ff.synthetic_ratings(num_users=300, num_items=200, seed=2).prepare(max_examples=300, shuffle_seed=2)
    config = ff.preset("paper", dim=16)
    model = ff.GlobalModel.initialize(data.item_ids, config)

    def run(r):
        return ff.train_round(model.item_factors, data, None, config.client, seed=1, round=r, num_threads=2).delta

    serial = [run(r) for r in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, range(8)))
    for a, b in zip(serial, concurrent):
        assert np.array_equal(a, b)
    assert not np.array_equal(serial[0], serial[1])  # rounds differ, so the check is not vacuous


def test_every_cohort_kernel_is_reentrant_across_python_threads():
    """All cohort kernels at once from several Python threads (they share the process-wide
    worker free list and thread pool) give exactly their serial results."""
    data = ff.synthetic_ratings(num_users=300, num_items=200, seed=3).prepare(max_examples=300, shuffle_seed=3)
    config = ff.preset("fast", dim=16, learn_user_default=True)
    model = ff.GlobalModel.initialize(data.item_ids, config, global_mean=3.5)
    common = dict(item_bias=model.item_bias, global_mean=model.global_mean, num_threads=2, **model.default_kwargs())
    clients = np.arange(0, 300, 2)
    ups = ff.client_updates(model.item_factors, data, clients, config.client, **common)
    calls = {
        "train_round": lambda r: (
            ff.train_round(
                model.item_factors, data, clients, config.client, round=r, codec=ff.UpdateCodec(bits=8), **common
            ).delta
        ),
        # The native loop updates the model in place: on copies.
        "rounds": lambda r: ff.kernels.train_rounds(
            model.item_factors.copy(),
            data,
            config.client,
            first_round=r,
            num_rounds=2,
            clients_per_round=40,
            item_bias=model.item_bias.copy(),
            global_mean=model.global_mean,
            num_threads=2,
        )["loss_sum"],
        "updates": lambda r: (
            ff.client_updates(model.item_factors, data, clients, config.client, round=r, **common).values
        ),
        "reduce": lambda r: ff.kernels.reduce_updates(
            ups.rows,
            ups.values,
            ups.offsets,
            ups.weights * (r + 1),
            num_items=data.num_items,
            bias_values=ups.bias_values,
            num_threads=2,
        )[0],
        "reconstruct": lambda r: ff.reconstruct_users(
            model.item_factors, data, clients, config.client, round=r, **common
        )[0],
        "evaluate": lambda r: ff.evaluate_users(
            model.item_factors, data, clients, config.client, round=r, k=10, **common
        )["ndcg"],
        "recommend": lambda r: ff.kernels.recommend_users(
            model.item_factors, data, clients, config.client, round=r, k=5, **common
        )[0],
    }
    jobs = [(name, r) for name in calls for r in range(3)]
    serial = [calls[name](r) for name, r in jobs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(lambda job: calls[job[0]](job[1]), jobs))
    for (name, _), a, b in zip(jobs, serial, concurrent):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.slow
def test_kernels_work_in_a_forked_child_after_the_parent_used_threads():
    # The native thread pool must be rebuilt in a fork()ed child (its threads do not exist
    # there); a stale pool would hang. Run in a subprocess with a timeout.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import multiprocessing as mp
        import numpy as np
        import fedrecon_fast as ff

        def round_delta(_):
            d = ff.synthetic_ratings(num_users=120, num_items=60, seed=4).prepare(shuffle_seed=4)
            V = ff.GlobalModel.initialize(d.item_ids, ff.preset("paper", dim=8)).item_factors
            return ff.train_round(V, d, None, ff.preset("paper").client, seed=1, num_threads=2).delta

        parent = round_delta(0)
        with mp.get_context("fork").Pool(2) as pool:
            children = pool.map(round_delta, range(2))
        assert all(np.array_equal(parent, c) for c in children)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
