"""Milliseconds per paper round with 8-bit quantized client updates, dense and sparse.

A dense quantized update with one scale per client decodes to noise on every row the client
did not touch (stochastic rounding of 0), so the server's mean covers every row of V for every
client: a pass over num_items x dim values per client. This script times that round against the
float32 dense round and the 8-bit sparse round on the same clients, and checks that the 8-bit
mean stays within the quantization error of the float32 one.

Usage: ``python bench/dense_quantization.py [--rounds N] [--threads 1 0] [--synthetic]``;
prints one JSON line per (case, threads).
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
from _problems import ff, paper_problem  # noqa: E402

CASES = {
    "float32 dense": ff.UpdateCodec(sparse=False),
    "8-bit dense": ff.UpdateCodec(bits=8, sparse=False, threshold=20000),
    "8-bit dense, row scales": ff.UpdateCodec(bits=8, sparse=False, threshold=20000, row_scaling=True),
    "8-bit dense, Hadamard": ff.UpdateCodec(bits=8, sparse=False, threshold=20000, hadamard=True),
    "8-bit sparse": ff.UpdateCodec(bits=8, sparse=True, threshold=0),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds timed per case")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 0])
    parser.add_argument("--synthetic", action="store_true", help="use synthetic data even if MovieLens is present")
    args = parser.parse_args(argv)

    config, train, model, source = paper_problem(synthetic=args.synthetic)
    cohorts = [ff.sample_clients(train.num_clients, config.clients_per_round, config.seed, r)
               for r in range(args.rounds)]

    def run(r, threads, codec=None):
        return ff.train_round(model.item_factors, train, cohorts[r], config.client, seed=config.seed, round=r,
                              num_threads=threads, codec=codec)

    # Stochastic rounding moves a decoded value by less than one step of its client's scale
    # ((max - min) / 255 of the client's dense update, zeros included), so the weighted mean
    # moves by less than the largest step; the orthonormal rotation can spread a row's errors
    # over its coordinates (at most sqrt(padded dim) steps each).
    updates = ff.client_updates(model.item_factors, train, cohorts[0], config.client, seed=config.seed, round=0)
    step = max(float(max(np.max(v, initial=0.0), 0.0) - min(np.min(v, initial=0.0), 0.0)) / 255
               for v in (updates.client(k)[1] for k in range(len(updates))))
    for threads in args.threads:
        exact = run(0, threads).delta
        for case, codec in CASES.items():
            delta = run(0, threads, codec).delta  # warm-up, and the correctness check
            spread = np.sqrt(64) if codec.hadamard else 1.0
            bound = (step * spread if codec.bits else 0.0) + 1e-7
            assert np.abs(delta - exact).max() <= bound, (case, np.abs(delta - exact).max(), bound)
            times = []
            for r in range(args.rounds):
                start = time.perf_counter()
                run(r, threads, codec)
                times.append(time.perf_counter() - start)
            print(json.dumps({"case": case, "data": source, "threads": threads or os.cpu_count(),
                              "ms_per_round_median": 1e3 * float(np.median(times)),
                              "ms_per_round_p10": 1e3 * float(np.quantile(times, 0.1))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
