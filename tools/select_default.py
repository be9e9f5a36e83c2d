"""Choose and report the ``default`` preset: validation users for the choice, test users for the table.

Usage::

    python tools/select_default.py select [--seeds 0,1,2] [--sets small,sparse-half,...] [--out FILE]
    python tools/select_default.py table  [--seeds 0-9]   [--presets default,paper,fast] [--out FILE]

``select`` trains every candidate configuration on every data set and seed and scores it on the
*validation* users only (ReconEval RMSE and Recall@10); it prints one JSON line per run and a
Markdown summary. ``table`` trains the named presets and scores them on the *test* users, the
table in ``docs/default_preset.md``. Both count divergence (a run that stops with
``FloatingPointError``). The data sets are MovieLens 1M, users 1-2999 (``$FEDRECON_ML1M``,
default ``../shared/data/ml-1m``; skipped when absent), and seeded synthetic sets of different
sizes, sparsity and rating scales (``fedrecon_fast.synthetic_ratings``), listed in ``SETS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import fedrecon_fast as ff

ML1M = Path(os.environ.get("FEDRECON_ML1M", Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"))

#: Synthetic data sets: synthetic_ratings keyword arguments (data seed 1, never a training seed).
SETS = {
    # ~94k ratings, 1-5 stars: the small set on which `paper` diverged on one seed in ten.
    "small": dict(num_users=1000, num_items=1700, mean_ratings=100, min_ratings=20),
    # ~94k ratings, half stars, a long tail of rarely rated items (like ml-latest-small).
    "sparse-half": dict(num_users=610, num_items=9700, mean_ratings=165, min_ratings=20,
                        popularity=1.0, half_stars=True),
    # ~50k ratings over 20,000 items, few ratings per user, half stars.
    "very-sparse": dict(num_users=4000, num_items=20000, mean_ratings=12, min_ratings=3,
                        popularity=0.8, half_stars=True),
    # ~100k ratings, half the matrix filled.
    "dense": dict(num_users=500, num_items=400, mean_ratings=200, min_ratings=50, popularity=0.2),
    # ~2M ratings, half stars.
    "large": dict(num_users=20000, num_items=5000, mean_ratings=100, min_ratings=20,
                  popularity=0.6, half_stars=True),
    # ~140k ratings, heavy users (mean 300) and a very steep popularity curve, half stars.
    "steep": dict(num_users=500, num_items=3000, mean_ratings=300, min_ratings=50, popularity=1.2,
                  half_stars=True),
}

#: Candidates of the selection: overrides of the ``fast`` preset (exact ridge reconstruction
#: and biases), plus ``paper`` itself for reference.
CANDIDATES = {
    "paper": ("paper", {}),
    "fast": ("fast", {}),
    "fast, client lr .3": ("fast", dict(client_lr=0.3)),
    "fast, client lr .2": ("fast", dict(client_lr=0.2)),
    "fast, client lr .1": ("fast", dict(client_lr=0.1)),
    "fast, ridge 1": ("fast", dict(ridge=1.0)),
    "fast, ridge 10": ("fast", dict(ridge=10.0)),
    # second round, around the first round's best
    "fast, client lr .8": ("fast", dict(client_lr=0.8)),
    "fast, ridge 2": ("fast", dict(ridge=2.0)),
    "fast, ridge 2, client lr .8": ("fast", dict(ridge=2.0, client_lr=0.8)),
}


def load_set(name: str) -> ff.ClientData:
    """One of the data sets by name ("ml-1m" or a key of SETS)."""
    if name == "ml-1m":
        return ff.load_movielens(ML1M)
    return ff.synthetic_ratings(seed=1, **SETS[name])


def available_sets() -> list[str]:
    return (["ml-1m"] if (ML1M / "ratings.dat").is_file() else []) + list(SETS)


def run(data: ff.ClientData, config: ff.FedReconConfig, part: str) -> dict:
    """Train on the training users, score on ``part`` ("val" or "test") users."""
    train, val, test = ff.split_ratings(data, config)
    start = time.perf_counter()
    trainer = ff.FedRecon(config)
    try:
        trainer.fit(train)
    except FloatingPointError as e:
        return {"diverged": True, "error": str(e), "seconds": time.perf_counter() - start}
    m = trainer.evaluate(val if part == "val" else test)
    return {"diverged": False, "rmse": m["rmse"], "mae": m["mae"], "recall_at_10": m["recall_at_10"],
            "ndcg_at_10": m["ndcg_at_10"], "seconds": time.perf_counter() - start}


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds.extend(range(int(lo), int(hi or lo) + 1))
    return seeds


def summarize(rows: list[dict], key: str) -> str:
    """Markdown: one row per ``key`` value, one column per data set (mean RMSE, Recall@10)."""
    sets = list(dict.fromkeys(r["set"] for r in rows))
    names = list(dict.fromkeys(r[key] for r in rows))
    lines = [f"| {key} | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for name in names:
        cells = []
        for s in sets:
            runs = [r for r in rows if r[key] == name and r["set"] == s]
            ok = [r for r in runs if not r["diverged"]]
            if not runs:
                cells.append("–")
                continue
            if not ok:
                cells.append(f"diverged {len(runs)}/{len(runs)}")
                continue
            rmse = np.array([r["rmse"] for r in ok])
            recall = np.array([r["recall_at_10"] for r in ok])
            sd = f" ± {rmse.std(ddof=1):.3f}" if len(ok) > 1 else ""
            cell = f"{rmse.mean():.3f}{sd} / {recall.mean():.3f}"
            if len(ok) < len(runs):
                cell += f" (diverged {len(runs) - len(ok)}/{len(runs)})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["select", "table"])
    parser.add_argument("--seeds", help="e.g. 0-9 or 0,1,2 (default: select 0-2, table 0-9)")
    parser.add_argument("--sets", help="comma-separated data sets (default: all available)")
    parser.add_argument("--candidates", help="select: names of CANDIDATES separated by ';' (default: all)")
    parser.add_argument("--presets", default="default,paper,fast", help="table: presets to compare")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    parser.add_argument("--out", type=Path, help="append the JSON lines to this file")
    args = parser.parse_args(argv)

    seeds = parse_seeds(args.seeds or ("0-2" if args.mode == "select" else "0-9"))
    sets = args.sets.split(",") if args.sets else available_sets()
    if args.mode == "select":
        names = args.candidates.split(";") if args.candidates else list(CANDIDATES)
        configs = {n: ff.preset(CANDIDATES[n][0], **CANDIDATES[n][1]) for n in names}
        key, part = "candidate", "val"
    else:
        configs = {n: ff.preset(n) for n in args.presets.split(",")}
        key, part = "preset", "test"

    rows = []
    for s in sets:
        data = load_set(s)
        for name, config in configs.items():
            for seed in seeds:
                row = {"set": s, key: name, "seed": seed, "part": part,
                       **run(data, config.replace(seed=seed, num_threads=args.threads), part)}
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                if args.out is not None:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
    print()
    print(f"{'validation' if part == 'val' else 'test'} RMSE (mean ± sd over seeds {args.seeds or seeds}) "
          "/ Recall@10")
    print(summarize(rows, key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
