"""namm-transfer: one frozen, evolved NAMM applied zero-shot to language, video and offline-RL transformers.

Every command writes a run directory (config.json, predictions.jsonl, metrics.json, log.txt) and reuses
finished runs; rerun a killed command to resume it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer.options import Parser, check_device

ROOT = Path(__file__).resolve().parents[1]
EPILOG = """examples:
  namm-transfer reproduce --preset quick         # every domain on the shipped models, report in runs/reproduce/report
  namm-transfer eval lm --policies full,h2o,l2,namm --budget match
  namm-transfer eval rl --env hopper --policies namm --limit 5
  namm-transfer eval video --benchmark longvideobench --data DIR --model ID_OR_PATH
  namm-transfer evolve --preset cpu-small       # CMA-ES on the shipped LM, resumable
  namm-transfer namm inspect artifacts/namm/namm-shipped
  namm-transfer policies
"""


# ------------------------------------------------------------------------------------------ small commands
def _policies(args: argparse.Namespace) -> int:
    from transfer.policies import POLICIES

    tags = {"required": "budget", "optional": "budget optional", "none": "no budget"}
    for name, cls in POLICIES.items():
        print(f"{name:12s} {cls.description}  [{tags[cls.budget_rule]}]")
    return 0


def _namm_inspect(args: argparse.Namespace) -> int:
    from transfer.checkpoint import inspect_namm

    print(json.dumps(inspect_namm(args.checkpoint), indent=2, default=str))
    return 0


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="our checkpoint directory or a reference-implementation .pt file")


# ------------------------------------------------------------------------------------------ command table
@dataclass(frozen=True)
class Command:
    """A leaf command. `arguments` and `run` are 'module:function' names, imported only when this command
    is the one asked for; `arguments` lives in a module without torch, so `--help` stays instant.
    `own_parser`: the trainer parses its own options (run gets the remaining argv); `arguments` is then a
    function returning that parser, which answers `--help` without importing the trainer."""

    help: str
    run: str
    arguments: str | None = None
    own_parser: bool = False


COMMANDS: dict[str, Any] = {
    "policies": Command("list the memory policies with one-line descriptions", "transfer.cli:_policies"),
    "namm": {
        "_help": "NAMM checkpoint tools",
        "inspect": Command("config, parameter count and norm statistics of a NAMM checkpoint",
                           "transfer.cli:_namm_inspect", "transfer.cli:_inspect_arguments"),
    },
    "eval": {
        "_help": "evaluate memory policies in one domain",
        "lm": Command("language: synthetic long-context tasks on a causal LM", "eval.lm:run",
                      "eval.lm:add_arguments"),
        "rl": Command("offline RL: Decision Transformer rollouts in MuJoCo", "eval.rl:run",
                      "eval.options:add_rl_arguments"),
        "video": Command("video QA: LLaVA-NeXT-Video on LongVideoBench / MLVU / synthetic", "eval.video:run",
                         "eval.options:add_video_arguments"),
    },
    "evolve": Command("evolve a NAMM with CMA-ES on a causal LM (resumable)", "train.evolve:run",
                      "train.options:add_evolve_arguments"),
    "train": {
        "_help": "train the small shipped models (`train <what> --help` for options)",
        "lm": Command("the source LM on synthetic long-context tasks", "train.lm:main", "train.options:lm_parser",
                      own_parser=True),
        "dt": Command("a Decision Transformer from a D4RL hdf5 / Minari dataset", "train.dt:main",
                      "train.options:dt_parser", own_parser=True),
        "video": Command("the LLaVA-NeXT-Video models on synthetic video QA", "train.video:main",
                         "train.options:video_parser", own_parser=True),
    },
    "reproduce": Command("every domain on the embedded defaults -> report (tables, plots)", "eval.reproduce:run",
                         "eval.reproduce:add_arguments"),
}


def _load(name: str) -> Callable[..., Any]:
    module, _, attr = name.partition(":")
    return getattr(__import__(module, fromlist=[attr]), attr)


def selected(argv: Sequence[str]) -> tuple[list[str], Command | None]:
    """The command path named by argv's leading words (e.g. ['eval', 'lm']) and its leaf, if reached."""
    node: Any = COMMANDS
    path: list[str] = []
    for word in argv:
        if not isinstance(node, dict) or word not in node or word.startswith("_"):
            break
        node = node[word]
        path.append(word)
    return path, node if isinstance(node, Command) else None


# ------------------------------------------------------------------------------------------ version
def version_string() -> str:
    """The installed package version and, in a git checkout, the commit (marked -dirty with local edits)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = f"namm-transfer {version('namm-transfer')}"
    except PackageNotFoundError:
        text = "namm-transfer (not installed)"
    if (ROOT / ".git").exists():
        try:
            git = ["git", "-C", str(ROOT)]
            commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    timeout=5, check=True).stdout.strip()
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=5).stdout.strip()
            text += f" (git {commit}{'-dirty' if dirty else ''})"
        except (OSError, subprocess.SubprocessError):
            pass
    return text


class _Version(argparse.Action):
    """--version, computed only when asked (the git call costs time every other command should not pay)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_string())
        parser.exit()


# ------------------------------------------------------------------------------------------ parser
def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The CLI's parser. Only the command that argv names gets its options (imported lazily); the others
    are listed with their one-line help, so `namm-transfer --help` imports nothing heavy."""
    parser = Parser(prog="namm-transfer", description=__doc__, epilog=EPILOG)
    parser.add_argument("--version", action=_Version, help="print the package version and git commit, then exit")
    path, _ = selected(argv)

    def add(sub: Any, name: str, node: Any, depth: int) -> None:
        chosen = len(path) > depth and path[depth] == name
        if isinstance(node, Command):
            p = sub.add_parser(name, help=node.help, description=node.help)
            if chosen and node.arguments and not node.own_parser:  # a trainer: its own parser
                _load(node.arguments)(p)
            p.set_defaults(command=node)
            return
        p = sub.add_parser(name, help=node["_help"], description=node["_help"])
        children = p.add_subparsers(dest=f"command_{depth + 1}", required=True, metavar="{" + ",".join(
            k for k in node if not k.startswith("_")) + "}")
        for child, value in node.items():
            if not child.startswith("_"):
                add(children, child, value, depth + 1)

    sub = parser.add_subparsers(dest="command_0", required=True,
                                metavar="{" + ",".join(COMMANDS) + "}")
    for name, node in COMMANDS.items():
        add(sub, name, node, 0)
    return parser


# ------------------------------------------------------------------------------------------ checks
def _looks_local(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text


def check_hub_model(model: str | None) -> None:
    """A hub id that cannot load is refused in one line before any work, instead of after five retries.

    A local path, a template ('{env}') or a reachable hub pass; an unreachable hub passes only if the
    model is in the local cache (then everything loads offline, without the retries).
    """
    if not model or "{" in model or Path(model).expanduser().exists():
        return
    if _looks_local(model):
        raise FileNotFoundError(f"model {model}: no such directory (a hub id has the form name or owner/name)")
    if os.environ.get("HF_HUB_OFFLINE", "") in ("", "0", "false", "False") and _hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # an invalid id: the loader's own message says so
        return
    if not cached:
        raise ValueError(hub_unreachable(model))


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a proxy decides; the loader will say
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_unreachable(model: str) -> str:
    return (f"model {model}: the Hugging Face hub is unreachable and the model is not in the local cache; "
            f"pass a local directory with --model PATH (e.g. `hf download {model} --local-dir DIR` on a machine "
            "with internet)")


def check_inputs(args: argparse.Namespace) -> None:
    """Checks every command shares, before anything loads: the device, a hub model, the NAMM checkpoint
    (`reproduce --config` is checked by eval/reproduce.py, which knows its format)."""
    device = getattr(args, "device", None)
    rest = getattr(args, "rest", None)
    if rest is not None:  # a trainer: its --device, whichever way it is written
        for i, word in enumerate(rest):
            if word == "--device" and i + 1 < len(rest):
                device = rest[i + 1]
            elif word.startswith("--device="):
                device = word.partition("=")[2]
    if isinstance(device, str):
        check_device(device)
    model = getattr(args, "model", None)
    if isinstance(model, str):
        check_hub_model(model)
    namm = getattr(args, "namm", None)
    if isinstance(namm, str):  # loaded (4172 numbers) to refuse a missing, broken or non-finite NAMM up front
        from transfer.checkpoint import load_namm

        load_namm(namm)


# ------------------------------------------------------------------------------------------ errors
_HUB_MISSING = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError")
_HUB_OFFLINE = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError",
                "ConnectTimeout")


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen and len(seen) < 10:
        seen.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return seen


def user_error(err: BaseException, model: str | None = None) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback).

    Hub failures (missing repo, no network, invalid id) are recognised here, in one place, from the
    exception classes huggingface_hub raises and transformers wraps in OSError.
    """
    names = {type(e).__name__ for e in _chain(err)}
    text = " ".join(str(err).split())
    found = re.match(r"(\S+) is not a local folder and is not a valid model identifier", text)
    model = found.group(1).strip("'\"") if found else model
    if names & set(_HUB_MISSING) or found:
        return (f"model {model}: not found on the Hugging Face hub (a gated or private repo needs `hf auth login`);"
                " pass a hub id such as owner/name or a local directory with --model PATH")
    if names & set(_HUB_OFFLINE) or "couldn't connect to" in text:
        return hub_unreachable(model) if model else f"the Hugging Face hub is unreachable ({text})"
    if "HFValidationError" in names:  # without the model's name, the loader's message names the path
        return f"model {model}: neither a local directory nor a valid hub id (name or owner/name)" if model else text
    if isinstance(err, ImportError):
        missing = getattr(err, "name", None) or text
        return f"{missing} is not installed (an optional dependency): pip install 'namm-transfer[all]'"
    if isinstance(err, (ValueError, OSError, KeyError)):
        return text or type(err).__name__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check, run: every failure the user can fix ends as one `error: ...` line and exit status 2."""
    from transfer.log import is_terminal, quiet_third_party

    argv = list(sys.argv[1:] if argv is None else argv)
    path, command = selected(argv)
    if command is not None and command.own_parser:  # `train lm ...`: the trainer parses the rest
        rest = argv[len(path):]
        if command.arguments and {"-h", "--help"} & set(rest) and rest[:1] != ["eval"]:
            _load(command.arguments)().parse_args(rest)  # prints the help and exits, no torch imported
        args = argparse.Namespace(command=command, rest=rest)
    else:
        args = build_parser(argv).parse_args(argv)
        command = args.command
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # tables and progress lines interleave in a log file
    model = getattr(args, "model", None)
    try:
        check_inputs(args)
        heavy = command.run.split(":")[0] not in ("transfer.cli",)
        quiet_third_party(is_terminal(), load_transformers=heavy)
        if command.own_parser:
            _load(command.run)(args.rest)
            return 0
        result = _load(command.run)(args)
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if type(err).__name__ == "TimeBudgetReached":  # transfer.runner's (not imported here: fast --help)
            print(f"stopped: {err}", file=sys.stderr)
            return 3
        message = user_error(err, model if isinstance(model, str) else None)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
