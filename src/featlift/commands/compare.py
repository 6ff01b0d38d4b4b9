"""``featlift compare``: the command line of `featlift.compare` (every method on every task, cached, one leaderboard)."""

from __future__ import annotations

import argparse

from ..compare import CompareOptions, run_compare
from ..compare.methods import BUDGET_FIELDS, parse_budget
from ..compare.tasks import TASKS, parse_task_settings
from .common import (
    VARIANT_GRAMMAR,
    add_backbone_args,
    add_device_arg,
    add_max_memory_arg,
    backbone_from_args,
    memory_defaults,
    weights_from_args,
)

DEFAULT_TASKS = "davis,probe-voc,probe-camvid,warp"


def _items(values: list[str] | None) -> list[str]:
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="rank every upsampler on quality and cost over several tasks (leaderboard.md, results.json, Pareto plot)",
        description="Run every --methods spec on every --tasks task and write DIR/leaderboard.md, DIR/results.json "
        "and DIR/pareto.png. Each (method, task) cell is cached in DIR/cells under a hash of everything that "
        "determines it (method spec, checkpoint fingerprint, task settings, protocol, backbone fingerprint, "
        "device): a rerun computes only the cells that are missing or whose settings changed. A task whose "
        "dataset is missing under --data-root is reported and skipped (exit code 1).",
    )
    add_backbone_args(parser)
    parser.add_argument(
        "--methods",
        action="append",
        default=None,
        metavar="SPEC[,SPEC...]",
        help=f"methods, comma-separated and/or repeated: {VARIANT_GRAMMAR} (required unless --include is given)",
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="DIR",
        help="join the cells of another compare run (its --out folder or results.json) to this leaderboard, "
        "without recomputing them; refused unless its backbone, device and the settings of every shared task "
        "equal this run's (the dataset path aside); repeatable",
    )
    parser.add_argument(
        "--tasks",
        action="append",
        default=None,
        metavar="TASK[,TASK...]",
        help=f"tasks among {', '.join(TASKS)} (default {DEFAULT_TASKS})",
    )
    parser.add_argument(
        "--data-root",
        required=True,
        metavar="DATA",
        help="folder holding each task's dataset under its usual name: davis2016/, voc2012/, camvid/, imagenet-sample/",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (cells cache, leaderboard)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TASK.FIELD=VALUE",
        help="a task setting, as its `featlift eval` config names it (repeatable): davis.max_frames=10, "
        "davis.sequences=blackswan,dog, warp.limit=20, probe-voc.limit_train=50; without TASK. it sets every task",
    )
    parser.add_argument(
        "--size",
        default=None,
        metavar="S|HxW",
        help="the base input size of every task (default: each task's, 224)",
    )
    parser.add_argument(
        "--train-missing",
        action="store_true",
        help="train every trainable method that has no checkpoint for this backbone, with its own objective, on "
        "--train-data for --budget (the same for all); checkpoints go to DIR/trained/ and are reused (a killed "
        "training resumes after its last epoch)",
    )
    parser.add_argument(
        "--train-data", default=None, metavar="IMAGES", help="training images (default DATA/imagenet-sample)"
    )
    defaults = ",".join(f"{k}={v}" for k, v in BUDGET_FIELDS.items())
    parser.add_argument(
        "--budget",
        default=None,
        metavar="KEY=VALUE[,...]",
        help=f"training budget of --train-missing, the same for every method (default {defaults})",
    )
    add_max_memory_arg(parser)
    add_device_arg(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    tasks = _items(args.tasks) or DEFAULT_TASKS.split(",")
    items = ([f"size={args.size}"] if args.size else []) + args.set
    options = CompareOptions(
        methods=_items(args.methods),
        tasks=tasks,
        data_root=args.data_root,
        out=args.out,
        settings=parse_task_settings(items, tasks),
        device=args.device,
        weights=weights_from_args(args),
        method_defaults=memory_defaults(args),
        train_missing=args.train_missing,
        train_data=args.train_data,
        budget=parse_budget(args.budget),
        progress=not args.quiet,
        include=args.include,
    )
    outcome = run_compare(options, backbone_from_args(args))
    print(outcome.board.markdown())
    plot = f", {outcome.plot}" if outcome.plot else ""
    joined = f", {outcome.included} included" if outcome.included else ""
    print(
        f"featlift compare: {outcome.computed} cells computed, {outcome.cached} from the cache{joined} -> "
        f"{outcome.leaderboard}, {outcome.results}{plot}"
    )
    return 0 if outcome.complete else 1
