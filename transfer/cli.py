"""namm-transfer: one frozen, evolved NAMM applied zero-shot to language, video and offline-RL transformers.

Every command writes a run directory (config.json, predictions.jsonl, metrics.json) and reuses
finished runs; rerun a killed command to resume it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EPILOG = """examples:
  namm-transfer reproduce --preset quick         # every domain on the shipped models, report in runs/report
  namm-transfer eval lm --policies full,h2o,l2,namm --budget match
  namm-transfer eval rl --env hopper --policy namm --episodes 5
  namm-transfer eval video --benchmark longvideobench --data DIR --model ID_OR_PATH
  namm-transfer evolve --preset cpu-small       # CMA-ES on the shipped LM, resumable
  namm-transfer namm inspect artifacts/namm/namm-shipped
  namm-transfer policies
"""


def _policies(args: argparse.Namespace) -> int:
    from transfer.policies import BUDGETED, POLICIES

    for name, (_, description) in POLICIES.items():
        tag = "budget" if name in BUDGETED else ("budget optional" if name == "namm" else "no budget")
        print(f"{name:10s} {description}  [{tag}]")
    return 0


def _namm_inspect(args: argparse.Namespace) -> int:
    from transfer.checkpoint import inspect_namm

    print(json.dumps(inspect_namm(args.checkpoint), indent=2, default=str))
    return 0


DEFAULTS = argparse.ArgumentDefaultsHelpFormatter  # --help shows every option's default

TRAINERS = {
    "lm": ("train.lm", "the source LM on synthetic long-context tasks"),
    "dt": ("train.dt", "a Decision Transformer from a D4RL hdf5 / Minari dataset"),
    "video": ("train.video", "the tiny LLaVA-NeXT-Video model on synthetic video QA"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="namm-transfer", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("policies", help="list the memory policies with one-line descriptions")
    p.set_defaults(func=_policies)

    namm = sub.add_parser("namm", help="NAMM checkpoint tools").add_subparsers(dest="namm_command", required=True)
    p = namm.add_parser("inspect", help="config, parameter count and norm statistics of a NAMM checkpoint")
    p.add_argument("checkpoint", help="our checkpoint directory or a reference-implementation .pt file")
    p.set_defaults(func=_namm_inspect)

    ev = sub.add_parser("eval", help="evaluate memory policies in one domain").add_subparsers(
        dest="domain", required=True
    )
    from eval import lm

    p = ev.add_parser("lm", help="language: synthetic long-context tasks on a causal LM", formatter_class=DEFAULTS)
    lm.add_arguments(p)
    p.set_defaults(func=lm.run)
    for name, module, help_text in (
        ("rl", "eval.rl", "offline RL: Decision Transformer rollouts in MuJoCo"),
        ("video", "eval.video", "video QA: LLaVA-NeXT-Video on LongVideoBench / MLVU / synthetic"),
    ):
        try:
            mod = __import__(module, fromlist=["run"])
        except ImportError as err:  # optional extras missing: the command explains itself
            p = ev.add_parser(name, help=f"{help_text} (unavailable: {err})")
            p.set_defaults(func=lambda a, e=err: sys.exit(f"error: {e}; install namm-transfer[all]"))
            continue
        p = ev.add_parser(name, help=help_text, formatter_class=DEFAULTS)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)

    from train import evolve

    p = sub.add_parser("evolve", help="evolve a NAMM with CMA-ES on a causal LM (resumable)", formatter_class=DEFAULTS)
    evolve.add_arguments(p)
    p.set_defaults(func=evolve.run)

    train = sub.add_parser("train", help="train the small shipped models (`train <what> --help` for options)")
    train = train.add_subparsers(dest="what", required=True)
    for name, (_, help_text) in TRAINERS.items():
        train.add_parser(name, help=help_text)  # parsing is the trainer's own (see main)

    from eval import reproduce

    p = sub.add_parser("reproduce", help="every domain on the embedded defaults -> report (tables, plots)",
                       formatter_class=DEFAULTS)
    reproduce.add_arguments(p)
    p.set_defaults(func=reproduce.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train = len(argv) >= 2 and argv[0] == "train" and argv[1] in TRAINERS  # the trainer parses its own options
    args = None if train else build_parser().parse_args(argv)
    try:
        if train:
            __import__(TRAINERS[argv[1]][0], fromlist=["main"]).main(argv[2:])
            return 0
        result = args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
