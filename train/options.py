"""Options of the trainers, importable without torch so that `namm-transfer evolve --help` and
`namm-transfer train <what> --help` answer at once; the trainers (train/evolve.py, train/dt.py, train/lm.py,
train/video.py) build their parsers from here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from tasks.language import DEFAULT_LM
from transfer.options import Parser, positive_float, positive_int

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


# ------------------------------------------------------------------------------------------ train dt
TARGET_RULES = ("paper", "data-max")


@dataclass
class DTConfig:
    data: str = ""  # D4RL-format hdf5, Minari dataset folder, or local Minari dataset id
    env: str = ""  # default: the dataset's environment
    out: str = "runs/dt"
    minari_root: str = ""  # where Minari ids are looked up (default $MINARI_DATASETS_PATH or ~/.minari/datasets)
    version: str = "v5"
    context: int = 64  # K steps; the model sees 3K tokens (R, s, a)
    hidden: int = 128
    layers: int = 3
    heads: int = 1
    dropout: float = 0.1
    max_ep_len: int = 1000
    return_scale: float = 1000.0  # adapters.decision_transformer.DEFAULT_SCALE (a test keeps them equal)
    target_return: float | None = None  # given: used as is; else by target_rule
    target_rule: str = "paper"  # paper: the DT paper's per-env target; data-max: best episode return in the data
    obs: str = "full"  # observation variant (envs.mujoco.OBS_VARIANTS): "pos" drops the velocities
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup: int = 500
    grad_clip: float = 0.25
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # 0: torch default
    log_every: int = 50
    ckpt_every: int = 500  # resume checkpoint interval (steps)
    max_minutes: float = 0.0  # >0: stop early (and save) once training has run this long
    eval_episodes: int = 0  # >0: evaluate with rollout_sliding_window after training (needs gymnasium)
    eval_max_steps: int = 1000
    # float16: the shipped weights are rounded to half precision (half the repository's size per agent); the final
    # evaluation and every later one use exactly the rounded weights (loaded back in float32, rolled out in float64)
    save_dtype: str = "float32"


def dt_parser() -> Parser:
    """`train dt`'s options (defaults from DTConfig)."""
    d = DTConfig()
    p = Parser(prog="namm-transfer train dt", description="Train a small Decision Transformer (HF "
               "DecisionTransformerModel, GPT-2 backbone) on an offline dataset (D4RL hdf5 or Minari).")
    p.add_argument("--data", required=True,
                   help="D4RL-format hdf5, a Minari dataset folder, or a local Minari dataset id (no download)")
    p.add_argument("--env", default="", help="hopper | halfcheetah | walker2d (default: the dataset's)")
    p.add_argument("--out", required=True)
    p.add_argument("--minari-root", default="", help="root of local Minari datasets (default: $MINARI_DATASETS_PATH "
                                                     "or ~/.minari/datasets)")
    for name in ("version", "context", "hidden", "layers", "heads", "dropout", "max_ep_len", "return_scale",
                 "target_return", "steps", "batch_size", "lr", "weight_decay", "warmup", "grad_clip", "seed",
                 "device", "threads", "log_every", "ckpt_every", "max_minutes", "eval_episodes", "eval_max_steps"):
        default = getattr(d, name)
        typ = float if name == "target_return" else type(default)
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=default)
    p.add_argument("--target-rule", default=d.target_rule, choices=TARGET_RULES,
                   help="without --target-return: paper = the DT paper's per-env target, data-max = the best "
                        "episode return in the training data")
    p.add_argument("--save-dtype", default=d.save_dtype, choices=("float32", "float16"),
                   help="float16: ship half-precision weights (half the size); the final evaluation already uses them")
    p.add_argument("--obs", default=d.obs, choices=("full", "pos"),
                   help="observation variant: pos = positions only (velocities removed; see envs/mujoco.py)")
    return p


# ------------------------------------------------------------------------------------------ train lm
LM_DESCRIPTION = "Train the small source LM: a random-init Llama (GQA, RoPE) on the dense synthetic task mixture."


def lm_parser() -> Parser:
    """`train lm`'s options (train/lm.py checks the task names and sizes after parsing)."""
    from tasks.synthetic import TASKS, TRAIN_ONLY_TASKS  # numpy only

    p = Parser(prog="namm-transfer train lm", description=LM_DESCRIPTION)  # one-line errors
    p.add_argument("--out", required=True, help="directory for the final model + tokenizer + logs")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint directory (default OUT/ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir if it holds a checkpoint")
    p.add_argument("--init-from", default=None,
                   help="start from these weights (HF model dir or model.pt) with a fresh optimiser; "
                        "with --state-from, also continue that run's step/stage/schedule")
    p.add_argument("--state-from", default=None, help="state.json to continue (with --init-from)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tasks", nargs="+", default=list(TASKS),
                   help=f"training formats: {', '.join(TASKS)} and training-only {', '.join(TRAIN_ONLY_TASKS)}")
    # model
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--rope-theta", type=float, default=1e5)
    p.add_argument("--max-positions", type=int, default=8192)
    # optimisation
    p.add_argument("--steps", type=int, default=20000, help="schedule length in steps")
    p.add_argument("--train-minutes", type=float, default=0.0, help="schedule length in minutes (0: steps)")
    p.add_argument("--max-minutes", "--stop-minutes", dest="stop_minutes", type=float, default=0.0,
                   help="stop this invocation after N minutes (0: no limit)")
    p.add_argument("--batch-tokens", type=int, default=65536,
                   help="tokens per step per process (batch = this // length)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    # curriculum
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--advance-acc", type=float, default=0.9, help="macro answer-token accuracy to lengthen")
    p.add_argument("--min-stage-steps", type=int, default=200)
    p.add_argument("--max-stage-steps", type=int, default=3000, help="lengthen anyway after this many steps")
    p.add_argument("--replay", type=float, default=0.25, help="probability of a shorter, earlier length")
    # bookkeeping
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--workers", type=int, default=0, help="data worker processes (per training process)")
    p.add_argument("--eval-lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--eval-n", type=int, default=50)
    p.add_argument("--eval-seed", type=int, default=1234, help="validation seed (never the held-out test seed)")
    p.add_argument("--save-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    return p


# ------------------------------------------------------------------------------------------ train video
LONG_CURRICULUM = "32/0/300;48,64/0/600;64,80,96,112,128/-2,0,64,128/0"


def video_parser() -> Parser:
    """`train video`'s options."""
    p = Parser(prog="namm-transfer train video",
               description="Train the tiny LLaVA-NeXT-Video model on synthetic video QA.")
    p.add_argument("--out", required=True, help="output dir: model + processor + metrics + PROVENANCE.md")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps; 0 = fit into --max-minutes")
    p.add_argument("--max-minutes", type=float, default=0.0, help="minutes of training (0 = no limit)")
    p.add_argument("--time-budget", type=float, default=None, help=argparse.SUPPRESS)  # the old name, in seconds
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--frames", default="32,64", help="frame counts drawn per batch, comma separated")
    p.add_argument("--stages", default="", help="curriculum qtypes/frames/steps;... (overrides --steps/--frames)")
    p.add_argument("--frame-budget", type=int, default=0,
                   help="frames per batch (videos = budget // frames, constant cost across lengths); 0 = --batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=7, help="training seed (eval set uses tasks/synth_video's 1234)")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-hidden", type=int, default=128)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--eval-dir", default="", help="LongVideoBench-layout held-out set to score at the end")
    p.add_argument("--eval-npz", default="", help="pre-decoded frames of --eval-dir (see decode_frames_npz)")
    p.add_argument("--eval-frames", default="",
                   help="frame counts for the final eval, comma separated (default: 32; --task long: one count, 128)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500, help="checkpoint for --resume every N steps")
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.pt")
    p.add_argument("--init", default="", help="start from the weights of a model dir saved by this script")
    p.add_argument("--task", choices=("synth", "long"), default="synth",
                   help="synth: the 32-frame task of the shipped tiny model (tasks/synth_video.py); long: the "
                        "64-128-frame task whose questions need the whole video (tasks/long_video.py, issue 19)")
    g = p.add_argument_group("--task long")
    g.add_argument("--curriculum", default=LONG_CURRICULUM,
                   help="lengths/frames/steps;... video lengths, sampled frames (0 = every frame, -2 = half) and "
                        "steps per stage; the last stage runs until --steps")
    g.add_argument("--workers", type=int, default=0, help="data-loader processes rendering the training stream")
    g.add_argument("--eval-every", type=int, default=500, help="validation (model selection) every N steps")
    g.add_argument("--warmup", type=int, default=200)
    g.add_argument("--aux-weight", type=float, default=0.2,
                   help="weight of the auxiliary loss: each frame's last video token predicts the colour on "
                        "screen (dense supervision that shortens the uniform-answer plateau; 0 = off)")
    g.add_argument("--vision-layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--val-videos", type=int, default=None, help="default: the split's size (tasks/long_video.py)")
    g.add_argument("--test-videos", type=int, default=None, help="default: the split's size (tasks/long_video.py)")
    g.add_argument("--recency-budget", type=float, default=0.25, help="the memory-matters check's recency budget")
    g.add_argument("--export", default="", help="copy the model (tar.gz), split state, log and metrics here ($OUT)")
    g.add_argument("--resume-from", default="", help="folder holding train_state.pt or its .partNN pieces")
    g.add_argument("--eval-only", action="store_true", help="only the final test evaluation of <out>/model")
    return p
