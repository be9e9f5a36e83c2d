"""FedAvg with and without 8-bit compression, through fedrecon_fast's public API.

The offline analogue of TensorFlow Federated's compression tutorial, on a model that is not
matrix factorization: a one-hidden-layer MLP (64-256-10, ReLU, softmax) in NumPy on
scikit-learn's bundled digits data split across clients. Each client's update is encoded with
``fedrecon_fast.compression.encode`` (real bytes; like TFF, tensors below ``--threshold``
elements stay float32) and aggregated with ``fedrecon_fast.aggregation.WeightedMean``; the
uncompressed run sends float32. Prints one JSON line per round and a final summary line.

Usage: ``python bench/compression_demo.py [--rounds 60] [--bits 8]`` (needs scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from fedrecon_fast import compression
from fedrecon_fast.aggregation import WeightedMean


def load(num_clients: int, seed: int):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    test, train = order[:360], order[360:]
    shards = np.array_split(rng.permutation(train), num_clients)
    return [(X[s], y[s]) for s in shards], (X[test], y[test])


HIDDEN = 256


def init_params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"W1": (rng.standard_normal((64, HIDDEN)) * np.sqrt(2 / 64)).astype(np.float32),
            "b1": np.zeros(HIDDEN, np.float32),
            "W2": (rng.standard_normal((HIDDEN, 10)) * np.sqrt(2 / HIDDEN)).astype(np.float32),
            "b2": np.zeros(10, np.float32)}


def forward(p, X):
    h = np.maximum(X @ p["W1"] + p["b1"], 0.0)
    return h, h @ p["W2"] + p["b2"]


def gradients(p, X, y) -> dict:
    h, logits = forward(p, X)
    logits -= logits.max(1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(1, keepdims=True)
    prob[np.arange(len(y)), y] -= 1.0
    d = prob / len(y)
    dh = (d @ p["W2"].T) * (h > 0)
    return {"W1": X.T @ dh, "b1": dh.sum(0), "W2": h.T @ d, "b2": d.sum(0)}


def local_update(params, X, y, *, epochs: int, batch: int, lr: float, rng) -> dict:
    p = {k: v.copy() for k, v in params.items()}
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for lo in range(0, len(y), batch):
            idx = order[lo:lo + batch]
            for k, g in gradients(p, X[idx], y[idx]).items():
                p[k] -= lr * g
    return {k: p[k] - params[k] for k in p}


def run(clients, test, *, rounds: int, per_round: int, bits: int | None, threshold: int, seed: int):
    params = init_params(seed)
    total_bits = 0
    history = []
    for r in range(rounds):
        rng = np.random.default_rng([seed, r])
        sampled = rng.choice(len(clients), size=per_round, replace=False)
        means = {k: WeightedMean(v.shape, num_threads=1) for k, v in params.items()}
        for c in sampled:
            X, y = clients[c]
            update = local_update(params, X, y, epochs=2, batch=16, lr=0.1,
                                  rng=np.random.default_rng([seed, r, c]))
            for name, delta in update.items():
                if bits is None or delta.size < threshold:
                    total_bits += 32 * delta.size
                    means[name].add(delta, float(len(y)))
                else:
                    buf = compression.encode(delta, bits, seed=seed, round=r, client=int(c))
                    total_bits += 8 * len(buf)
                    means[name].add(compression.decode(buf), float(len(y)))
        for name, mean in means.items():
            params[name] += mean.result()
        X, y = test
        accuracy = float((forward(params, X)[1].argmax(1) == y).mean())
        history.append({"round": r + 1, "accuracy": accuracy, "aggregated_bits": total_bits})
    return history


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--threshold", type=int, default=100, help="smaller tensors stay float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    clients, test = load(args.clients, args.seed)
    runs = {name: run(clients, test, rounds=args.rounds, per_round=args.per_round, bits=bits,
                      threshold=args.threshold, seed=args.seed)
            for name, bits in (("float32", None), (f"{args.bits}bit", args.bits))}
    for name, history in runs.items():
        for h in history:
            print(json.dumps({"run": name, **h}))
    plain, packed = runs["float32"][-1], runs[f"{args.bits}bit"][-1]
    print(json.dumps({
        "summary": True, "rounds": args.rounds, "bits": args.bits,
        "accuracy_float32": plain["accuracy"], f"accuracy_{args.bits}bit": packed["accuracy"],
        "accuracy_difference_points": 100 * (packed["accuracy"] - plain["accuracy"]),
        "aggregated_bits_float32": plain["aggregated_bits"],
        f"aggregated_bits_{args.bits}bit": packed["aggregated_bits"],
        "bits_ratio": plain["aggregated_bits"] / packed["aggregated_bits"],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
