"""Resident memory across training rounds: the native round loop and the whole trainer.

Runs the paper recipe (MovieLens 1M users 1-2999 when present, else synthetic) for ``--rounds``
rounds and samples the process's resident set size (VmRSS) every ``--every`` rounds, first
calling :func:`kernels.train_round` in a bare loop (the kernel alone: worker scratch, arenas and
thread pool must be reused, not regrown), then through :class:`FedRecon` (which also keeps a
history row per round, by design). Prints one JSON line per phase with the RSS after warm-up,
at the end, and the growth per 1,000 rounds.

    python bench/memory_growth.py [--rounds 1000] [--every 100] [--synthetic]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fedrecon_fast as ff  # noqa: E402
from _machine import memory_mib  # noqa: E402
from _problems import paper_problem  # noqa: E402


def rss_mb() -> float:
    rss = memory_mib()["rss_mib"]
    if rss is None:
        raise RuntimeError("this benchmark needs /proc/self/status (Linux)")
    return rss


def _report(phase: str, samples: list, rounds: int, source: str) -> dict:
    first, last = samples[0][1], samples[-1][1]
    span = samples[-1][0] - samples[0][0]
    out = {"case": "memory_growth", "phase": phase, "data": source, "rounds": rounds,
           "rss_mb_after_warmup": first, "rss_mb_end": last,
           "growth_mb_per_1000_rounds": (last - first) * 1000 / span if span else 0.0,
           "samples": samples}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--synthetic", action="store_true")
    args = p.parse_args(argv)
    config, train, model, source = paper_problem(synthetic=args.synthetic)
    config = config.replace(rounds=args.rounds, eval_every=0)

    samples = []
    for r in range(args.rounds):
        clients = ff.sample_clients(train.num_clients, config.clients_per_round, config.seed, r)
        ff.train_round(model.item_factors, train, clients, config.client, seed=config.seed, round=r)
        if (r + 1) % args.every == 0:
            samples.append((r + 1, rss_mb()))
    results = [_report("kernel", samples, args.rounds, source)]

    samples = []
    trainer = ff.FedRecon(config)
    trainer.fit(train, rounds=0)
    for r in range(0, args.rounds, args.every):
        trainer.fit(train, rounds=min(args.every, args.rounds - r))
        samples.append((trainer.round, rss_mb()))
    results.append(_report("trainer", samples, args.rounds, source))
    return results


if __name__ == "__main__":
    main()
