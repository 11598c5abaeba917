"""Options of the trainers that the CLI builds itself (`evolve`), importable without torch so that
`namm-transfer evolve --help` answers at once; train/evolve.py re-exports them.
"""

from __future__ import annotations

import argparse
from typing import Any

from tasks.language import DEFAULT_LM
from transfer.options import positive_float, positive_int

PRESETS: dict[str, dict[str, Any]] = {
    # Runs on the 2-core CPU in a few minutes: proves the loop, not a useful NAMM.
    "cpu-small": dict(stages=["niah_single"], generations=[3], popsize=6, prompts=4, length=512,
                      update_interval=128),
    # The shipped NAMM's recipe on one GPU (see artifacts/namm/namm-shipped/PROVENANCE.md): the tasks the
    # shipped LM solves with its full cache, at lengths where the full cache starts to fail.
    "gpu": dict(stages=["niah_single,vt", "niah_single,vt,fwe"], generations=[24, 16], popsize=32, prompts=16,
                length=2048, update_interval=256),
    # The reference's three stages (a retrieval task; + two; + the rest) on artifacts/lm/llama-8k-recall at
    # 4k tokens, on the tasks it solves below ceiling (count 0.40, passage 0.85) or at ceiling at 4k but
    # below it at 8k (fwe_decoy, fwe, niah_single); a 25 % recency cache loses 25-100 points on each.
    # 100 generations; the reference's population; 32 prompts per task, to be checked with
    # `--measure-noise` (train/EVOLVE_8K.md). 512 rows (members x prompts) per forward fit an H200.
    "gpu-8k": dict(stages=["passage", "passage,count,fwe_decoy", "passage,count,fwe_decoy,fwe,niah_single"],
                   generations=[30, 30, 40], popsize=32, prompts=32, length=4096, update_interval=256,
                   batch_size=512, model=str(DEFAULT_LM.parent / "llama-8k-recall")),
    # gpu-8k's stages at 2048 tokens with half the population and prompts: what fits three seeds x 100
    # generations in one session's 30 device minutes (train/evolve_gpu.sh runs the seeds side by side). At
    # 2k the LM's full cache is below ceiling on count (0.58) and passage (0.88) and a 25 % recency cache
    # loses 42-99 points on each of the five tasks (artifacts/lm/llama-8k-recall/heldout.md); held-out tests run at 4k.
    # Every member of a generation answers the same prompts, so CMA-ES ranks them on common draws.
    "gpu-2k": dict(stages=["passage", "passage,count,fwe_decoy", "passage,count,fwe_decoy,fwe,niah_single"],
                   generations=[30, 30, 40], popsize=16, prompts=16, length=2048, update_interval=256,
                   batch_size=512, model=str(DEFAULT_LM.parent / "llama-8k-recall")),
}


def add_evolve_arguments(p: argparse.ArgumentParser) -> None:
    """`evolve`: CMA-ES over the NAMM's parameters on a causal LM."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small",
                   help="cpu-small: a few generations on the CPU in minutes; gpu: the shipped NAMM's recipe; "
                        "gpu-8k: three stages, 100 generations on llama-8k-recall at 4k tokens; gpu-2k: the same "
                        "stages at 2k tokens, population 16, 16 prompts per task (one session's GPU for 3 seeds)")
    p.add_argument("--model", default=None, help="HF causal LM id or path (default: the preset's, else the shipped LM)")
    p.add_argument("--stages", nargs="+", help="tasks per stage, e.g. mqar mqar,niah_multikey (overrides preset)")
    p.add_argument("--generations", nargs="+", type=positive_int, help="generations per stage (overrides preset)")
    p.add_argument("--popsize", type=positive_int, help="CMA-ES population size (overrides preset)")
    p.add_argument("--prompts", type=positive_int, help="prompts per task per generation")
    p.add_argument("--length", type=positive_int, help="prompt length in tokens")
    p.add_argument("--update-interval", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="rows (CMA-ES members x prompts) per forward pass (default: preset's, else 16)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="one evolution per seed, each in OUT/seed-N with its curve; "
                        "OUT/fitness_seeds.png overlays them")
    p.add_argument("--measure-noise", type=positive_int, default=None, metavar="K",
                   help="instead of evolving: evaluate generation 1's population on K fresh prompt draws and "
                        "write the fitness noise next to the population's spread to OUT/noise.json")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--out", default="runs/evolve", help="output directory; rerun the same command to resume")
    p.add_argument("--max-minutes", type=positive_float, default=None, help="stop (checkpointed) after this wall time")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out (a rerun with other options is refused without it)")
