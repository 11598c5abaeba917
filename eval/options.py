"""Command-line options of `eval rl` and `eval video`, importable without torch (`namm-transfer eval rl
--help` answers at once; eval/rl.py and eval/video.py import torch at module level). eval/lm.py keeps
its own `add_arguments` (that module imports nothing heavy).

Each domain module re-exports its function as `add_arguments`, so `reproduce` and the CLI build the
same parser. One vocabulary: `--policies` (alias `--policy`), `--limit` for the number
of examples (lm: per task; rl: episodes per environment; video: videos), `--model`, `--seed`, `--out`.
"""

from __future__ import annotations

import argparse

from tasks.video_bench import LVB_SPLITS, MLVU_DEV_TASKS
from transfer.options import add_run_arguments, finite_float, positive_int

# offline RL
DEFAULT_ENVS = "hopper,halfcheetah,walker2d"
# video (tasks/video_io.py imports the LLaVA adapter, hence torch: its tuples are repeated here and
# tests/test_cli.py checks that they agree)
BENCHMARKS = ("synthetic", "longvideobench", "mlvu")
FRAME_SAMPLINGS = ("lmms-eval", "lvb-official")
BACKENDS = ("pyav", "decord", "auto")


def add_rl_arguments(p: argparse.ArgumentParser) -> None:
    """`eval rl`: Decision Transformer rollouts in MuJoCo."""
    p.add_argument("--env", default=DEFAULT_ENVS, help="comma-separated environments")
    p.add_argument("--model", default=None,
                   help="DT id or path, '{env}' is replaced by the environment name (e.g. "
                        "edbeeching/decision-transformer-gym-{env}-medium); default: the shipped artifacts/rl/dt-<env>")
    p.add_argument("--state-stats", default=None,
                   help="JSON with state_mean/state_std ('{env}' replaced); default: state_stats.json beside the "
                        "weights, the model config, or the public model card's values")
    p.add_argument("--limit", "--episodes", dest="episodes", type=positive_int, default=5,
                   help="episodes per environment")
    p.add_argument("--target-return", type=finite_float, default=None,
                   help="default: the model config's (DT paper's)")
    p.add_argument("--max-steps", type=positive_int, default=1000, help="episode length cap (1000 = standard)")
    p.add_argument("--env-version", dest="version", default="v5", help="gymnasium MuJoCo version (v5 or v4)")
    p.add_argument("--version", dest="version", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--no-window", action="store_true", help="skip the sliding-window (no cache) reference rows")
    p.add_argument("--window-steps", default=None,
                   help="memory protocol: also sliding windows (no cache) of these sizes in steps, e.g. 8,16,32, "
                        "beside policies at the same budgets in tokens (a DT step is 3 tokens: 8 steps = 24t)")
    p.add_argument("--train-seeds", default=None,
                   help="several training seeds' models, e.g. 0,1,2 with '{seed}' in --model: every seed's "
                        "episodes are units of their environment, paired across policies")
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode (episode i: seed + i)")
    add_run_arguments(p, batch_size=16, out="runs/rl")


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    """`eval video`: LLaVA-NeXT-Video on LongVideoBench, MLVU or the synthetic set."""
    p.add_argument("--benchmark", default="synthetic", choices=BENCHMARKS)
    p.add_argument("--split", default="val", choices=tuple(LVB_SPLITS),
                   help="LongVideoBench split: val (lvb_val.json, scored) or test (lvb_test_wo_gt.json: no "
                        "answers, writes longvideobench_test_for_submission.json per policy, no score)")
    p.add_argument("--subtitles", action="store_true",
                   help="LongVideoBench: put the subtitle lines between the frames as the official loader does "
                        "(<data>/subtitles/<subtitle_path>, shifted by starting_timestamp_for_subtitles)")
    p.add_argument("--tasks", default=None,
                   help=f"MLVU: comma-separated dev tasks to run (default all: {','.join(MLVU_DEV_TASKS)}); "
                        "the M-Avg is over the tasks run")
    p.add_argument("--frame-sampling", default="lmms-eval", choices=FRAME_SAMPLINGS,
                   help="lmms-eval (default): --frames indices uniform over the container's frames (llava_hf); "
                        "lvb-official: the LongVideoBench loader's rule, int(int(duration*fps)/n)*i with "
                        "n = min(--frames, int(duration)), at most one frame a second")
    p.add_argument("--data", default=None,
                   help="benchmark folder (LongVideoBench: lvb_val.json + videos/; MLVU: json/ + video/); "
                        "synthetic reads none: its test split is generated from seeds (tasks/long_video.py)")
    p.add_argument("--synthetic-videos", type=positive_int, default=100,
                   help="synthetic only: videos of the held-out test split (a multiple of 5, 5 questions each; "
                        "a smaller set is its own balanced draw from the test seeds)")
    p.add_argument("--synthetic-lengths", default="64,80,96,112,128",
                   help="synthetic only: video lengths (64-128 frames), balanced over the set (the quick preset: 64)")
    p.add_argument("--model", default=None,
                   help="LLaVA-NeXT-Video id or path; default: the shipped artifacts/video/llava-next-video-long")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="frames per video (with --frame-sampling lvb-official: at most this many); default 128 "
                        "on the synthetic set (the shipped model's protocol), 32 on benchmark files")
    p.add_argument("--chunk-size", type=positive_int, default=512, help="max tokens per forward")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="default: the benchmark's (LVB 32, MLVU 16)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N videos (default: all)")
    p.add_argument("--backend", default="pyav", choices=BACKENDS, help="video decoder")
    p.add_argument("--seed", type=int, default=0, help="seed of the random fallback letter for unparsable replies")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    add_run_arguments(p, batch_size=1, out="runs/video")
