"""The command-line vocabulary every command shares, importable without torch so that `--help` is instant.

Argument types that refuse bad values while parsing (so nothing runs and nothing is written), a parser
whose errors are one `error: ...` line, a help formatter that prints each default once, the device
check, and the policy/run options every `eval` domain shares (`add_run_arguments`). Nothing here may
import torch, transformers or gymnasium at module level: `transfer/cli.py` builds its parsers from it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn

# One memory-update interval for every domain: the shipped NAMM was evolved, and its normalisation
# statistics collected, with an update every 256 tokens (artifacts/namm/namm-shipped/PROVENANCE.md).
# docs/results/source-lm-gpu/ measures 64-512 on the source domain.
DEFAULT_UPDATE_INTERVAL = 256
# One protected set for every policy of a table: the newest 32 tokens (the question or instruction of a
# prompt, the current steps of an episode) and no sink tokens; both are printed in every table header.
DEFAULT_PROTECT_RECENT = 32
DEFAULT_PROTECT_SINK = 0
DEFAULT_CONTROLS = 5  # random-parameter NAMMs (seeds 0..4) per `namm-random` in --policies
DEFAULT_POLICIES = "full,h2o,l2,namm,namm-random"


# ------------------------------------------------------------------------------------------ value types
def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], want: str) -> Callable[[str], Any]:
    """An argparse `type`: parse with `convert`, accept only what `ok` says, one message naming the range."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    return parse


# A count or length (0 and negatives used to divide by zero or write empty runs); a count that may be zero
# (protected tokens); a finite number > 0 (time caps, learning rates); any finite number (a target return:
# 'nan' and 'inf' parse as floats but mean nothing here).
positive_int = _checked(int, lambda v: v >= 1, "a positive integer (1 or more)")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
finite_float = _checked(float, math.isfinite, "a finite number")


# ------------------------------------------------------------------------------------------ parser
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends `(default: X)` to an option's help once, and only where the help does not state it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <message> (see: <prog> --help)` on stderr, exit status 2.

    argparse's own error prints the whole usage block first; a mistyped value then scrolls its one
    useful line away. Subparsers inherit the class, so every command behaves the same.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        one_line = " ".join(message.split())
        sys.stderr.write(f"error: {one_line} (see: {self.prog} --help)\n")
        sys.exit(2)


# ------------------------------------------------------------------------------------------ devices
def check_device(name: str | None) -> None:
    """Refuse a device that cannot run here, before anything loads: cpu, cuda, cuda:N (N < GPUs), mps."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {name!r}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return
    if device.type == "mps" and torch.backends.mps.is_available():
        return
    raise ValueError(f"--device {name}: not available here; use cpu, cuda or cuda:N")


# ------------------------------------------------------------------------------------------ shared options
def add_run_arguments(p: argparse.ArgumentParser, batch_size: int = 8, out: str = "runs") -> None:
    """The policy and run options every domain shares (one vocabulary across `eval lm|rl|video`)."""
    p.add_argument("--policies", "--policy", default=DEFAULT_POLICIES,
                   help="comma-separated policies (list them: `namm-transfer policies`); name@budget sets one budget")
    p.add_argument("--budget", default="match",
                   help="budgets of budgeted policies: 'match' (the NAMM's measured kept fraction, per batch), "
                        "kept fractions in (0, 1] and token counts like 512t, e.g. match,0.25,0.5")
    p.add_argument("--controls", type=positive_int, default=DEFAULT_CONTROLS,
                   help="random-parameter NAMMs (seeds 0..N-1) that `namm-random` expands to")
    p.add_argument("--protect-recent", type=nonnegative_int, default=DEFAULT_PROTECT_RECENT,
                   help="newest tokens no policy may evict (the question/instruction region)")
    p.add_argument("--protect-sink", type=nonnegative_int, default=DEFAULT_PROTECT_SINK,
                   help="first tokens no policy may evict (attention sinks)")
    p.add_argument("--namm", default=None, help="NAMM checkpoint (our dir or reference .pt; default: shipped)")
    p.add_argument("--namm-precision", choices=["fp32", "fast"], default="fp32",
                   help="fp32: the reference's precision; fast: the NAMM's BAM attention in fp16 on CUDA")
    p.add_argument("--update-interval", type=positive_int, default=DEFAULT_UPDATE_INTERVAL,
                   help="tokens between memory updates (multiple of 16; the shipped NAMM's)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="examples per forward")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--out", default=out, help="run directory root (finished runs are reused)")
    p.add_argument("--overwrite", action="store_true", help="redo runs that exist instead of reusing them")
    p.add_argument("--max-minutes", type=positive_float, default=None,
                   help="stop after the batch that passes this wall time, keeping every finished row; "
                        "rerun the same command to resume (exit status 3 says it stopped early)")
