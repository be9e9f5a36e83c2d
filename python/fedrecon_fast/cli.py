"""Command line: ``fedrecon-fast train``, ``recommend``, ``paper`` and ``ablation``.

Without ``--data`` the job runs on a seeded synthetic data set with MovieLens-like statistics.
With ``--json`` the last line on stdout is one JSON object with the run's results.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import signal
import sys
import textwrap
import time
import warnings
from pathlib import Path

from . import __version__, _signals
from .config import PRESETS, preset, preset_help
from .loaders import SwappedColumnsWarning
from .memory import MemoryEstimateError
from .splits import split_ratings
from .training import FedRecon

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


def _int_at_least(minimum: int, maximum: int = _INT32_MAX):
    """An argparse type: an integer in [minimum, maximum], with a one-line error otherwise
    (the maximum is what the native code takes: a count is a 32-bit int)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)
_seed = _int_at_least(0, 2**64 - 1)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit status 2), like every other error of the CLI."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _with_default(text: str, default) -> str:
    return f"{text} (default: {default})"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks (the preset table), wraps the rest."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


_DESCRIPTION = """\
Federated Reconstruction (Singhal et al., NeurIPS 2021) for matrix-factorization recommenders:
train on a ratings file, evaluate on users never seen in training, recommend for new users.

  fedrecon-fast train --data ratings.csv --save model/
  printf 'item,rating\\n2858,5\\n260,4\\n' | fedrecon-fast recommend --model model/ --ratings -

Without --data, train uses a seeded synthetic data set with MovieLens-like statistics."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedrecon-fast", description=_DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train FedRecon and evaluate it on unseen test users",
        description=textwrap.fill(
            "Train FedRecon on a ratings file (or synthetic data) "
            "and evaluate it on test users never seen in training "
            "(ReconEval).",
            88,
        ),
        epilog=preset_help(),
        formatter_class=_HelpFormatter,
    )
    data = train.add_argument_group("data")
    data.add_argument(
        "--data",
        type=Path,
        metavar="PATH",
        help=_with_default(
            "ratings file (CSV, TSV, '::', ';', whitespace; parquet with pyarrow) or MovieLens folder",
            "a synthetic data set",
        ),
    )
    data.add_argument(
        "--columns",
        metavar="SPEC",
        help=_with_default(
            "which column is which: roles in column order, e.g. 'item,user,rating' "
            "('-' skips one), or 'user=uid,item=iid,rating=stars' by header name",
            "found by name, e.g. userId, movieId, rating; headerless files: user,item,rating[,timestamp]",
        ),
    )
    data.add_argument(
        "--sep",
        metavar="SEP",
        help=_with_default("field separator, e.g. ',', ';', '::', 'tab', 'whitespace'", "sniffed"),
    )
    data.add_argument(
        "--items",
        type=Path,
        metavar="FILE",
        help=_with_default(
            "item titles to save with the model (MovieLens movies.dat, movies.csv or u.item)", "one found beside --data"
        ),
    )
    model = train.add_argument_group("model and training (a preset, then these changes)")
    model.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help=_with_default("named configuration; the list is below", "default"),
    )
    model.add_argument(
        "--rounds", type=_non_negative_int, metavar="N", help=_with_default("federated rounds", "the preset's")
    )
    model.add_argument(
        "--clients-per-round",
        type=_positive_int,
        metavar="M",
        help=_with_default("clients sampled per round", "the preset's"),
    )
    model.add_argument(
        "--dim", type=_positive_int, metavar="K", help=_with_default("embedding dimension K", "the preset's")
    )
    model.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="S",
        help=_with_default("seed of every random choice (user split, sampling, ...)", 0),
    )
    model.add_argument(
        "--threads",
        type=_non_negative_int,
        default=0,
        metavar="T",
        help=_with_default(
            "threads of the native kernels (at most 4 per core are used); results do not depend on it", "0, all cores"
        ),
    )
    model.add_argument(
        "--learn-user-default",
        action="store_true",
        help=_with_default("learn a global default u federatedly (cold start for users without ratings)", "off"),
    )
    model.add_argument(
        "--backend",
        choices=["local", "ray", "flower"],
        default="local",
        help=_with_default(
            "local: in-process; ray: shards of each round on Ray workers "
            "(RAY_ADDRESS or a local Ray; [ray] extra; same results as local); "
            "flower: a Flower simulation on Ray, one node per user ([flower] "
            "extra)",
            "local",
        ),
    )
    evaluation = train.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval-every",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help=_with_default("validate every N rounds", "10 validations per run"),
    )
    evaluation.add_argument(
        "--rank-k",
        type=_positive_int,
        default=10,
        metavar="K",
        help=_with_default(
            "cut-off of the test ranking metrics (Recall, Precision, HR, NDCG, MAP, MRR, coverage; liked: rating >= 4)",
            10,
        ),
    )
    evaluation.add_argument(
        "--leave-one-out",
        action="store_true",
        help=_with_default(
            "also report leave-one-out HR@K and NDCG@K on the test users (each user's most recent rating held out)",
            "off",
        ),
    )
    comm = train.add_argument_group("communication and privacy of client updates")
    comm.add_argument(
        "--quantize-bits",
        type=_positive_int,
        metavar="B",
        help=_with_default(
            "quantize updates to B bits (1..16); dense updates cost a "
            "decoding pass over all rows per client (use with --sparse-updates)",
            "float32",
        ),
    )
    comm.add_argument(
        "--quantize-threshold",
        type=_int_at_least(0, _INT64_MAX),
        default=20000,
        metavar="N",
        help=_with_default("only variables with at least N elements are quantized (TFF's value)", 20000),
    )
    comm.add_argument(
        "--quantize-scaling",
        choices=["tensor", "row"],
        default="tensor",
        help=_with_default("one scale per update or per row", "tensor"),
    )
    comm.add_argument(
        "--hadamard", action="store_true", help=_with_default("randomized Hadamard rotation before quantizing", "off")
    )
    comm.add_argument(
        "--sparse-updates",
        action="store_true",
        help=_with_default("send only touched rows (ids + values)", "off: dense updates, as TFF"),
    )
    comm.add_argument(
        "--dp-clip",
        type=float,
        metavar="C",
        help=_with_default(
            "DP-FedAvg: clip each update to this L2 norm (switches to uniform client weighting)", "no clipping"
        ),
    )
    comm.add_argument(
        "--dp-noise",
        type=float,
        default=0.0,
        metavar="Z",
        help=_with_default("DP-FedAvg noise multiplier z (needs --dp-clip)", 0.0),
    )
    comm.add_argument(
        "--dp-delta",
        type=float,
        metavar="DELTA",
        help=_with_default("report the run's epsilon at this delta after every round ([dp] extra)", "no accounting"),
    )
    comm.add_argument(
        "--dp-target-epsilon",
        type=float,
        metavar="EPS",
        help=_with_default(
            "privacy budget: calibrate the noise multiplier so the run costs at most "
            "this epsilon (unless --dp-noise is given) and stop before a round would "
            "exceed it; needs --dp-clip and --dp-delta",
            "no budget",
        ),
    )
    comm.add_argument(
        "--dp-target-quantile",
        type=float,
        metavar="Q",
        help=_with_default(
            "adaptive clipping: move the clip norm (starting at --dp-clip) toward this quantile of the update norms",
            "a fixed clip norm",
        ),
    )
    comm.add_argument(
        "--dp-clip-lr",
        type=float,
        default=0.2,
        metavar="LR",
        help=_with_default("adaptive clipping's learning rate", 0.2),
    )
    comm.add_argument(
        "--dp-clip-count-stddev",
        type=float,
        metavar="S",
        help=_with_default("noise std of adaptive clipping's clipped count", "0.05 x clients per round"),
    )
    comm.add_argument(
        "--sampling",
        choices=["fixed", "poisson"],
        default="fixed",
        help=_with_default(
            "each round's cohort: a fixed number of distinct clients, or each client "
            "independently with probability clients-per-round / users (Poisson)",
            "fixed",
        ),
    )
    ckpt = train.add_argument_group("checkpoints")
    ckpt.add_argument(
        "--checkpoint-dir",
        type=Path,
        metavar="DIR",
        help=_with_default("write checkpoints of the whole training state here", "none"),
    )
    ckpt.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        metavar="N",
        help=_with_default("rounds between checkpoints", "a tenth of the rounds"),
    )
    ckpt.add_argument(
        "--resume",
        action="store_true",
        help=_with_default(
            "continue from the newest valid checkpoint in --checkpoint-dir (if "
            "any); the result is the uninterrupted run's",
            "off",
        ),
    )
    output = train.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=_with_default("write metrics.csv, metrics.json and learning_curve.png here", "none"),
    )
    output.add_argument(
        "--save", type=Path, metavar="DIR", help=_with_default("save the trained model here (for recommend)", "none")
    )
    output.add_argument(
        "--json", action="store_true", help=_with_default("print the results as one JSON line last", "off")
    )
    output.add_argument(
        "--no-progress", action="store_true", help=_with_default("hide the progress bar", "shown on a terminal")
    )

    rec = sub.add_parser(
        "recommend",
        help="top-k unseen items for a new user, from a saved model",
        formatter_class=_HelpFormatter,
        description=textwrap.fill(
            "Reconstruct a new user from its ratings and print the "
            "top-k items it has not rated, with titles when known.",
            88,
        )
        + "\n\n"
        + textwrap.fill(
            "FILE holds one 'item,rating' per line (item ids as in the "
            "training data); blank lines and lines starting with '#' are "
            "skipped, and the first line may be a header (its first field "
            "not a number, e.g. 'item,rating').",
            88,
        ),
    )
    rec.add_argument(
        "--model", type=Path, required=True, metavar="DIR", help="model folder written by train --save (required)"
    )
    rec.add_argument("--ratings", required=True, metavar="FILE", help="the user's ratings, '-' for stdin (required)")
    rec.add_argument(
        "--k",
        type=_int_at_least(1, _INT64_MAX),
        default=10,
        help=_with_default("number of items (at most the catalogue)", 10),
    )
    rec.add_argument(
        "--items",
        type=Path,
        metavar="FILE",
        help=_with_default(
            "item titles (MovieLens movies.dat, movies.csv or u.item)", "the model's, else one beside --ratings"
        ),
    )
    rec.add_argument(
        "--include-seen", action="store_true", help=_with_default("also recommend items the user rated", "off")
    )
    rec.add_argument(
        "--ignore-unknown",
        action="store_true",
        help=_with_default("drop ratings of items the model does not know", "off: an error"),
    )
    rec.add_argument(
        "--json",
        action="store_true",
        help=_with_default(
            'print {"items": [...], "scores": [...], "titles": [...]} as the last line (titles when known)', "off"
        ),
    )

    for name, helptext, out_help in (
        (
            "paper",
            "reproduce Table 1 of Singhal et al. (five rows, paper beside ours)",
            "write table1.md and table1.json here",
        ),
        (
            "ablation",
            "reproduce Figure 3: reconstruction steps kr x update steps ku",
            "write ablation.md, ablation.json and ablation.png here",
        ),
    ):
        p = sub.add_parser(
            name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".", formatter_class=_HelpFormatter
        )
        p.add_argument(
            "--data", type=Path, required=True, metavar="PATH", help="MovieLens folder or ratings file (required)"
        )
        p.add_argument("--seed", type=_seed, default=0, help=_with_default("seed", 0))
        p.add_argument(
            "--threads",
            type=_non_negative_int,
            default=0,
            help=_with_default("threads of the native kernels", "0, all cores"),
        )
        p.add_argument("--rounds", type=_positive_int, help=_with_default("federated rounds", "the paper's 500"))
        p.add_argument("--out", type=Path, metavar="DIR", help=_with_default(out_help, "none"))
        p.add_argument(
            "--json", action="store_true", help=_with_default("print the results as one JSON line last", "off")
        )
        p.add_argument(
            "--no-progress", action="store_true", help=_with_default("hide progress bars", "shown on a terminal")
        )
    return parser


def _load(args) -> tuple:
    from .loaders import load_ratings
    from .synthetic import synthetic_ratings

    start = time.perf_counter()
    if args.data is None:
        if args.columns is not None or args.sep is not None:
            raise ValueError("--columns and --sep describe a --data file; without --data the data are synthetic")
        data, source = synthetic_ratings(seed=args.seed), "synthetic"
    else:
        data, source = load_ratings(args.data, columns=args.columns, sep=args.sep), str(args.data)
    return data, source, time.perf_counter() - start


def _titles(args, model) -> str | None:
    """Attach item titles to ``model`` (--items, or a MovieLens title file beside --data);
    returns the file used, or None."""
    from .movielens import find_titles, load_titles

    path = args.items
    if path is None and args.data is not None:
        path = find_titles(args.data)
    if path is None or model.item_labels is not None:  # string ids are their own names
        return None
    ids, titles = load_titles(path)
    return str(path) if model.set_titles(ids, titles) else None


def _trainer_from_checkpoints(args, config) -> FedRecon:
    """A fresh trainer, or with --resume the one in the newest valid checkpoint."""
    from . import checkpoint

    directory = args.checkpoint_dir
    if directory is None:
        if args.resume:
            raise ValueError("--resume needs --checkpoint-dir")
        return FedRecon(config, backend=args.backend)
    existing = checkpoint.list_checkpoints(directory)
    if existing and not args.resume:
        raise ValueError(
            f"{directory} already holds checkpoints ({existing[0].name}); pass --resume to "
            "continue that run or choose an empty folder"
        )
    if not existing:
        return FedRecon(config, backend=args.backend)
    trainer = FedRecon.from_checkpoint(directory, config, backend=args.backend)
    if trainer.round > config.rounds:
        raise ValueError(f"the checkpoint is at round {trainer.round}, past --rounds {config.rounds}")
    return trainer


def _check_output_folder(path: Path | None, option: str) -> None:
    """Fail before any work when an output folder cannot be written (a file is in the way)."""
    if path is None:
        return
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{option} {path}: {p} exists and is not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {path}: {p} is not writable")
            return


def _write_atomically(out: Path, write) -> None:
    """Let ``write(folder)`` fill a new folder and swap it in for ``out`` as a whole
    (:func:`_folders.replace_folder`; files of an existing ``out`` that ``write`` does not
    write are carried over). A failure leaves ``out`` as it was, no temporary folder, and none
    of the parent folders this call created."""
    from ._folders import replace_folder

    created = [p for p in reversed((out, *out.parents)) if not p.exists()]
    try:
        replace_folder(out, write, keep_other_files=True)
    except BaseException:
        for p in reversed(created):  # the parents this call created, deepest first
            if p != out:
                try:
                    p.rmdir()
                except OSError:
                    break
        raise


def _train(args, config, train, val):
    """The trainer (resumed with --resume), fitted. With --checkpoint-dir the folder is locked
    from reading its checkpoint to writing the last one. SIGTERM, SIGINT and SIGHUP finish the
    round, write a final checkpoint and raise :class:`_signals.Stopped`."""
    from . import checkpoint

    progress = not args.no_progress and sys.stderr.isatty()
    if args.backend == "flower":
        if args.checkpoint_dir is not None or args.resume:
            raise ValueError("checkpoints are not supported with --backend flower")
        from .integrations.flower import FlowerFedRecon

        # Each fit starts and stops its own SuperLink: nothing to close afterwards.
        return FlowerFedRecon(config, num_cpus=args.threads or None).fit(train, val, progress=progress)
    with contextlib.ExitStack() as stack:
        fit_args = {}
        if args.checkpoint_dir is not None:
            stack.enter_context(checkpoint.locked(args.checkpoint_dir))
        trainer = _trainer_from_checkpoints(args, config)
        if args.checkpoint_dir is not None:
            every = args.checkpoint_every if args.checkpoint_every is not None else max(1, config.rounds // 10)
            fit_args = dict(
                rounds=config.rounds - trainer.round, checkpoint_dir=args.checkpoint_dir, checkpoint_every=every
            )
        stop = stack.enter_context(_signals.stop_on_signals())
        try:
            trainer.fit(train, val, progress=progress, **fit_args)
        finally:
            trainer.close()
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        saved = (
            f"checkpoint of round {trainer.round} in {args.checkpoint_dir}"
            if args.checkpoint_dir
            else "nothing saved (no --checkpoint-dir)"
        )
        raise _signals.Stopped(stop.signum, f"stopped by {name} after round {trainer.round}; {saved}")
    return trainer


def run_train(args) -> dict:
    _check_output_folder(args.out, "--out")
    _check_output_folder(args.save, "--save")
    _check_output_folder(args.checkpoint_dir, "--checkpoint-dir")
    overrides = {"seed": args.seed, "num_threads": args.threads}
    for field, value in (("rounds", args.rounds), ("clients_per_round", args.clients_per_round), ("dim", args.dim)):
        if value is not None:
            overrides[field] = value
    overrides.update(
        quantize_bits=args.quantize_bits,
        quantize_threshold=args.quantize_threshold,
        quantize_scaling=args.quantize_scaling,
        hadamard=args.hadamard,
        sparse_updates=args.sparse_updates,
        dp_clip=args.dp_clip,
        dp_noise=args.dp_noise,
        learn_user_default=args.learn_user_default,
        sampling=args.sampling,
    )
    overrides.update(_privacy_overrides(args))
    if args.dp_clip is not None:
        overrides["weighting"] = "uniform"  # DP-FedAvg bounds each client's influence
    config = preset(args.preset, **overrides)
    eval_every = args.eval_every if args.eval_every is not None else max(1, config.rounds // 10)
    config = config.replace(eval_every=eval_every)

    data, source, load_seconds = _load(args)
    try:
        train, val, test = split_ratings(data, config)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None

    trainer = _train(args, config, train, val)
    start = time.perf_counter()
    k = args.rank_k
    test_metrics = trainer.evaluate(test, per_user=True, k=k)
    if args.leave_one_out:
        from .evaluation import leave_one_out

        test_metrics.update(leave_one_out(trainer.model, test, k=k, num_threads=config.num_threads))
    test_seconds = time.perf_counter() - start

    round_times = sorted(h["round_seconds"] for h in trainer.history)
    last_val: dict = next((h for h in reversed(trainer.history) if "val_rmse" in h), {})
    result = {
        "data": source,
        "backend": args.backend,
        "preset": args.preset,
        "dim": config.dim,
        "rounds": config.rounds,
        "clients_per_round": config.clients_per_round,
        "threads": config.num_threads or os.cpu_count(),
        "seed": config.seed,
        "train_users": train.num_clients,
        "val_users": val.num_clients,
        "test_users": test_metrics["users"],
        "test_ratings": test_metrics["ratings"],
        "test_rmse": test_metrics["rmse"],
        "test_mae": test_metrics["mae"],
        "test_accuracy": test_metrics["accuracy"],
        "test_loss": test_metrics["loss"],
        "test_user_rmse": test_metrics.get("user_rmse"),
        "rank_k": k,
        **{f"test_{name}_at_{k}": test_metrics[f"{name}_at_{k}"] for name in _RANKING},
        "test_ranking_users": test_metrics["ranking_users"],
        **{f"test_{key}": value for key, value in test_metrics.items() if key.startswith("loo_")},
        "val_rmse": last_val.get("val_rmse"),
        "val_accuracy": last_val.get("val_accuracy"),
        "train_seconds": trainer.train_seconds,
        "round_ms_median": 1e3 * round_times[len(round_times) // 2] if round_times else None,
        "eval_seconds": trainer.eval_seconds + test_seconds,
        "load_seconds": load_seconds,
        "nonfinite_clients": int(sum(h["nonfinite"] for h in trainer.history)),
        "broadcasted_bits": trainer.broadcasted_bits,
        "aggregated_bits": trainer.aggregated_bits,
        "quantize_bits": config.quantize_bits,
        "sparse_updates": config.sparse_updates,
        "dp_clip": config.dp_clip,
        "dp_noise": trainer.config.dp_noise,
        "sampling": config.sampling,
        **_privacy_result(trainer),
    }
    written = []
    if args.save is not None:
        result["titles"] = _titles(args, trainer.model)
        written.append(str(args.save))
    if args.out is not None:
        written += [str(args.out / name) for name in _OUT_FILES if name != "learning_curve.png" or trainer.history]
    result["written"] = written
    # Both outputs are complete or absent: --out is committed only after --save succeeded.
    if args.out is None:
        if args.save is not None:
            trainer.model.save(args.save)
    else:

        def write(folder: Path) -> None:
            _write_outputs(folder, trainer, result)
            if args.save is not None:
                trainer.model.save(args.save)

        _write_atomically(args.out, write)
    return result


_OUT_FILES = ("metrics.csv", "metrics.json", "learning_curve.png")
_RANKING = ("recall", "precision", "hit_rate", "ndcg", "map", "mrr", "coverage")


def _privacy_overrides(args) -> dict:
    """The accounting, budget and adaptive clipping options that were given."""
    out = {"dp_clip_lr": args.dp_clip_lr}
    for field in ("dp_delta", "dp_target_epsilon", "dp_target_quantile", "dp_clip_count_stddev"):
        if getattr(args, field) is not None:
            out[field] = getattr(args, field)
    return out


def _privacy_result(trainer) -> dict:
    """The run's privacy for the JSON result: epsilon at delta so far, the final clip norm."""
    cfg = trainer.config
    if cfg.dp_clip is None:
        return {}
    last: dict = next((h for h in reversed(trainer.history) if "dp_epsilon" in h), {})
    clips = [h["dp_clip"] for h in trainer.history if "dp_clip" in h]
    return {
        "dp_delta": cfg.dp_delta,
        "dp_epsilon": last.get("dp_epsilon"),
        "dp_target_epsilon": cfg.dp_target_epsilon,
        "dp_clip_last": clips[-1] if clips else cfg.dp_clip,
        "dp_guarantee": "user-level, "
        + (
            "replace-one (fixed-size cohorts without replacement)"
            if cfg.sampling == "fixed"
            else "add-or-remove-one (Poisson sampling)"
        ),
        "rounds_run": trainer.round,
    }


def _write_outputs(out: Path, trainer: FedRecon, result: dict) -> None:
    from .experiments.plots import plot_learning_curve

    keys = list(dict.fromkeys(k for h in trainer.history for k in h))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(trainer.history)
    (out / "metrics.json").write_text(
        json.dumps({"config": trainer.config.to_dict(), "history": trainer.history, "result": result}, indent=1)
    )
    if trainer.history:
        plot_learning_curve(trainer.history, out / "learning_curve.png")


def _print_human(result: dict) -> None:
    print(
        f"data: {result['data']}  preset: {result['preset']}  K={result['dim']}  "
        f"rounds: {result['rounds']} x {result['clients_per_round']} clients  threads: {result['threads']}"
    )
    print(
        f"test (ReconEval, {result['test_users']} unseen users, {result['test_ratings']} ratings): "
        f"RMSE {result['test_rmse']:.4f}  MAE {result['test_mae']:.4f}  "
        f"accuracy {100 * result['test_accuracy']:.2f}%"
    )
    k = result["rank_k"]
    print(f"top {k} vs liked query items (rating >= 4; {result['test_ranking_users']} users have one):")
    shown = {
        "recall": "Recall",
        "precision": "Precision",
        "hit_rate": "HR",
        "ndcg": "NDCG",
        "map": "MAP",
        "mrr": "MRR",
        "coverage": "coverage",
    }
    print("  " + "  ".join(f"{label}@{k} {result[f'test_{name}_at_{k}']:.4f}" for name, label in shown.items()))
    if f"test_loo_hit_rate_at_{k}" in result:
        print(
            f"leave-one-out ({result['test_loo_users']} users, most recent rating held out): "
            f"HR@{k} {result[f'test_loo_hit_rate_at_{k}']:.4f}  NDCG@{k} {result[f'test_loo_ndcg_at_{k}']:.4f}"
        )
    median = result["round_ms_median"]
    median = "no rounds" if median is None else f"median round {median:.2f} ms"
    print(
        f"train {result['train_seconds']:.2f} s ({median}), "
        f"eval {result['eval_seconds']:.2f} s, load {result['load_seconds']:.2f} s"
    )
    if result.get("dp_epsilon") is not None:
        print(
            f"privacy: ({result['dp_epsilon']:.3f}, {result['dp_delta']:g})-DP, {result['dp_guarantee']}; "
            f"noise multiplier {result['dp_noise']:.4g}, {result['rounds_run']} rounds"
        )
    _print_written(result)


def _print_written(result: dict) -> None:
    for path in result.get("written", []):
        print(f"wrote {path}")
    if result.get("titles"):
        print(f"item titles from {result['titles']} are saved with the model")


def read_user_ratings(
    source: str, drop_out_of_range: bool = False, *, string_ids: bool = False
) -> tuple[list, list[float]]:
    """One user's ratings from ``item,rating`` lines (``-``: stdin).

    Blank lines and lines starting with ``#`` are skipped; the first remaining line is a header
    when its first field is not a number. Anything else that is not an integer item id and a
    finite rating raises ValueError naming the file and line. An item id beyond 64 bits (no
    model knows it) is an error too, unless ``drop_out_of_range`` (``--ignore-unknown``) drops
    its line like any unknown id. With ``string_ids`` (a model trained on string item ids) the
    ids are kept as text, and the first line is a header when its rating is not a number.
    """
    name = "<stdin>" if source == "-" else source
    try:
        raw = sys.stdin.buffer.read() if source == "-" and hasattr(sys.stdin, "buffer") else None
        if source == "-":
            text = sys.stdin.read() if raw is None else raw.decode("utf-8-sig")
        else:
            text = Path(source).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except IsADirectoryError:
        raise ValueError(f"{name}: is a folder, not a ratings file") from None
    items, ratings = [], []
    first, count = True, 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = [f.strip() for f in stripped.split(",")]
        if first:
            first = False
            try:
                float(fields[-1 if string_ids else 0])
            except ValueError:
                continue  # a header such as "item,rating"
        if len(fields) != 2:
            raise ValueError(f"{name}:{number}: expected 'item,rating', got {stripped!r}")
        if string_ids:
            item, out_of_range = fields[0], False
            if not item:
                raise ValueError(f"{name}:{number}: empty item id in {stripped!r}")
        else:
            try:
                item = int(fields[0])
            except ValueError:
                raise ValueError(f"{name}:{number}: item id must be an integer, got {fields[0]!r}") from None
            out_of_range = not -(2**63) <= item < 2**63
        if out_of_range and not drop_out_of_range:
            raise ValueError(f"{name}:{number}: item id {item} is out of range (64-bit ids)")
        try:
            rating = float(fields[1])
        except ValueError:
            rating = math.nan
        if not math.isfinite(rating):
            raise ValueError(f"{name}:{number}: rating must be a finite number, got {fields[1]!r}")
        count += 1
        if not out_of_range:
            items.append(item)
            ratings.append(rating)
    if not count:
        raise ValueError(f"{name}: no ratings (expected 'item,rating' lines)")
    return items, ratings


def run_recommend(args) -> dict:
    import numpy as np

    from .inference import item_rows
    from .model import GlobalModel

    model = GlobalModel.load(args.model)
    labels = model.item_labels
    items, ratings = read_user_ratings(
        args.ratings, drop_out_of_range=args.ignore_unknown, string_ids=labels is not None
    )
    names = items
    if labels is not None:  # string ids: their codes are the model's item ids
        pos = np.minimum(np.searchsorted(labels, np.asarray(items, dtype=str)), max(labels.size - 1, 0))
        items = (
            np.where(labels[pos] == np.asarray(items, dtype=str), pos, -1).tolist()
            if labels.size
            else [-1] * len(items)
        )
    known = item_rows(model, items, ignore_unknown=True) >= 0
    if not known.all() and not args.ignore_unknown:
        unknown = sorted(set(np.asarray(names)[~known].tolist()))
        shown = ", ".join(map(str, unknown[:10])) + (f", ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
        name = "<stdin>" if args.ratings == "-" else args.ratings
        raise ValueError(f"{name}: item ids unknown to the model: {shown} (use --ignore-unknown to drop them)")
    # Padding is dropped below, so k beyond the catalogue only costs memory: cap it.
    k = max(1, min(args.k, model.num_items))
    top, scores = model.recommend(
        items, ratings, k=k, exclude_seen=not args.include_seen, ignore_unknown=True, num_threads=1
    )
    found = ~np.isnan(scores)  # fewer candidates than k: the padded slots are left out
    rows = item_rows(model, top[found])
    shown = labels[top[found]].tolist() if labels is not None else top[found].tolist()
    # str() of a float32 is its shortest round-trip form: 4.709937, not 4.709936618804932.
    result = {"items": shown, "scores": [float(str(x)) for x in scores[found]], "num_ratings": int(known.sum())}
    titles = _recommend_titles(args, model)
    if titles is not None:
        result["titles"] = titles[rows].tolist()
    return result


def _recommend_titles(args, model):
    """Titles of the model's rows (from --items, the model, or a MovieLens file beside
    --ratings), or None when there are none."""
    from .movielens import find_titles, load_titles

    path = args.items
    if path is None and model.item_titles is None and args.ratings != "-":
        path = find_titles(Path(args.ratings).parent)
    if path is not None and model.item_labels is None:
        model.set_titles(*load_titles(path))
    return model.item_titles


def _print_recommendations(result: dict, k: int) -> None:
    n = len(result["items"])
    short = f" ({k} requested, only {n} candidates)" if n < k else ""
    print(f"top {n} items for a user with {result['num_ratings']} known ratings{short}:")
    titles = result.get("titles") or [""] * n
    for rank, (item, score, title) in enumerate(zip(result["items"], result["scores"], titles), start=1):
        name = f"{title} (item {item})" if title else f"item {item}"
        print(f"{rank:4d}. {name}  predicted rating {score:.3f}")


def run_paper(args) -> dict:
    from .experiments import paper
    from .movielens import load_movielens

    data = load_movielens(args.data)
    progress = not args.no_progress and sys.stderr.isatty()
    start = time.perf_counter()
    rows = paper.table1(data, seed=args.seed, num_threads=args.threads, rounds=args.rounds, progress=progress)
    result = {
        "data": str(args.data),
        "seed": args.seed,
        "rounds": args.rounds or 500,
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    markdown = paper.table1_markdown(rows)
    print(markdown)
    print(f"total {result['total_seconds']:.1f} s")
    if args.out is not None:

        def write(folder: Path) -> None:
            (folder / "table1.md").write_text(markdown + "\n")
            (folder / "table1.json").write_text(json.dumps(result, indent=1))

        _write_atomically(args.out, write)
        _print_written({"written": [str(args.out / name) for name in ("table1.md", "table1.json")]})
    return result


def run_ablation(args) -> dict:
    from .experiments import paper
    from .movielens import load_movielens

    data = load_movielens(args.data)
    progress = not args.no_progress and sys.stderr.isatty()
    start = time.perf_counter()
    result = paper.ablation(data, seed=args.seed, num_threads=args.threads, rounds=args.rounds, progress=progress)
    result.update(data=str(args.data), seed=args.seed, total_seconds=time.perf_counter() - start)
    markdown = paper.ablation_markdown(result)
    print(markdown)
    if args.out is not None:

        def write(folder: Path) -> None:
            (folder / "ablation.md").write_text(markdown + "\n")
            (folder / "ablation.json").write_text(json.dumps(result, indent=1))
            paper.plot_ablation(result, folder / "ablation.png")

        _write_atomically(args.out, write)
        _print_written({"written": [str(args.out / name) for name in ("ablation.md", "ablation.json", "ablation.png")]})
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input or options, 1 internal error).

    Every failure is one line on stderr, without a traceback (``FEDRECON_TRACEBACK=1`` shows
    the traceback of an internal error); so is a warning about the data. A reader that closes
    the pipe early (``| head``) ends the command quietly.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default", SwappedColumnsWarning)
        warnings.showwarning = _show_warning
        try:
            return _run(args)
        except BrokenPipeError:
            _silence_stdout()
            return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fedrecon-fast: warning: {_one_line(message)}", file=sys.stderr)


def _silence_stdout() -> None:
    """After a broken pipe: send what is left in stdout's buffer (and Python's final flush)
    to /dev/null instead of raising again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (e.g. captured by a test)
        pass


def _run(args) -> int:
    if args.command in ("paper", "ablation"):
        try:
            _check_output_folder(args.out, "--out")
        except ValueError as e:
            print(f"fedrecon-fast: error: {_one_line(e)}", file=sys.stderr)
            return 2
    try:
        if args.command == "train":
            result = run_train(args)
            _print_human(result)
        elif args.command == "recommend":
            result = run_recommend(args)
            _print_recommendations(result, args.k)
            result = {key: result[key] for key in ("items", "scores", "titles") if key in result}
        elif args.command == "paper":
            result = run_paper(args)
        else:
            result = run_ablation(args)
    except BrokenPipeError:
        raise
    except (ValueError, TypeError, OSError, FloatingPointError, ImportError, MemoryError) as e:
        message = (
            f"out of memory ({e or 'MemoryError'})"
            if isinstance(e, MemoryError) and not isinstance(e, MemoryEstimateError)
            else e
        )
        print(f"fedrecon-fast: error: {_one_line(message)}", file=sys.stderr)
        return 2
    except _signals.Stopped as e:  # SIGTERM, SIGINT or SIGHUP during training
        print(f"fedrecon-fast: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("fedrecon-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line, the traceback on request
        if os.environ.get("FEDRECON_TRACEBACK"):
            raise
        print(
            f"fedrecon-fast: internal error: {type(e).__name__}: {_one_line(e)} "
            "(set FEDRECON_TRACEBACK=1 for the traceback; please report it)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
