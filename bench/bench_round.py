"""Seconds per FedRecon round: native fused round vs the NumPy reference, same clients.

Prints one JSON line per case. Usage: ``python bench/bench_round.py [--rounds N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _problems import ff, paper_problem, rating_steps, reference_round  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50, help="native rounds timed")
    parser.add_argument("--reference-rounds", type=int, default=3, help="reference rounds timed")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 0])
    parser.add_argument("--synthetic", action="store_true", help="use synthetic data even if MovieLens is present")
    args = parser.parse_args(argv)

    config, train, model, source = paper_problem(synthetic=args.synthetic)
    rounds = list(range(args.rounds))
    cohorts = [ff.sample_clients(train.num_clients, config.clients_per_round, config.seed, r) for r in rounds]

    def native(r, threads):
        return ff.train_round(model.item_factors, train, cohorts[r], config.client, seed=config.seed,
                              round=r, num_threads=threads)

    ref_times = []
    for r in range(args.reference_rounds):
        start = time.perf_counter()
        ref = reference_round(model, train, cohorts[r], config, config.seed, r)
        ref_times.append(time.perf_counter() - start)
        got = native(r, 0)
        np.testing.assert_allclose(got.delta, ref.delta, rtol=1e-3, atol=1e-5)
    ref_median = float(np.median(ref_times))

    for threads in args.threads:
        native(0, threads)  # warm-up
        times, steps = [], []
        for r in rounds:
            start = time.perf_counter()
            res = native(r, threads)
            times.append(time.perf_counter() - start)
            steps.append(rating_steps(res.client_stats))
        median = float(np.median(times))
        print(json.dumps({
            "case": "paper_round",
            "data": source,
            "clients_per_round": config.clients_per_round,
            "threads": threads or os.cpu_count(),
            "native_seconds_per_round": median,
            "reference_seconds_per_round": ref_median,
            "speedup_vs_reference": ref_median / median,
            "rating_steps_per_round": float(np.mean(steps)),
            "native_rating_steps_per_second": float(np.mean(steps)) / median,
            "reference_rating_steps_per_second": float(np.mean(steps)) / ref_median,
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
