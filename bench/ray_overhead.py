"""Seconds per round of the Ray backend against the local executor, same cohorts, same results.

Paper recipe (K = 50, batch 5, split_dataset, <= 50 + 30 steps) on a synthetic MovieLens-like
problem large enough for 10,000 clients per round; the Ray executor runs on a local Ray with
``--workers`` actors (one native thread each) unless RAY_ADDRESS names a cluster. Prints one JSON
line per cohort size with the median seconds per round of each backend, the overhead (Ray minus
local) and whether every round's delta was bit-identical.

    python bench/ray_overhead.py [--clients 100 1000 10000] [--rounds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import fedrecon_fast as ff
from fedrecon_fast import kernels
from fedrecon_fast.distributed import RayExecutor


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--users", type=int, default=12000)
    args = p.parse_args(argv)

    config = ff.preset("paper")
    data = ff.synthetic_ratings(num_users=args.users, num_items=3700, seed=0).prepare(
        max_examples=config.max_examples, shuffle_seed=0)
    model = ff.GlobalModel.initialize(data.item_ids, config)
    V = model.item_factors
    with RayExecutor(num_workers=args.workers) as ray_ex:
        for m in args.clients:
            times = {"local": [], "ray": []}
            identical = True
            for r in range(args.rounds + 1):  # the first round warms up both backends
                clients = ff.sample_clients(data.num_clients, m, config.seed, r)
                out = {}
                for name, ex in (("local", kernels), ("ray", ray_ex)):
                    start = time.perf_counter()
                    out[name] = ex.train_round(V, data, clients, config.client, seed=0, round=r,
                                               num_threads=args.workers)
                    if r:
                        times[name].append(time.perf_counter() - start)
                identical &= np.array_equal(out["local"].delta, out["ray"].delta)
            local, ray = statistics.median(times["local"]), statistics.median(times["ray"])
            print(json.dumps({
                "case": "ray_overhead", "clients_per_round": m, "workers": args.workers,
                "local_threads": args.workers, "rounds": args.rounds,
                "local_seconds_per_round": local, "ray_seconds_per_round": ray,
                "overhead_seconds_per_round": ray - local, "ray_over_local": ray / local,
                "bit_identical": bool(identical),
            }), flush=True)


if __name__ == "__main__":
    main()
