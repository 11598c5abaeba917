#!/usr/bin/env bash
# Issue 22 on one H200, from the repo root: the GPU tests of the fast paths, then each bench once, every result as
# JSON in $OUT (at most 8 files come back). Two calls of at most 10 minutes (send the second within the machine's
# 30 s idle window; nothing here needs the first call's files):
#   PHASE=prefill bash bench/perf_gpu.sh   tests/test_gpu.py + test_gpu_decode.py, namm_stages (fused rows),
#                                         namm_prefill at 8k and 32k (recency anchor, eager reference path, NAMM
#                                         unfused / fused / Triton, fp32 and fast)
#   PHASE=decode  bash bench/perf_gpu.sh   decode_speed at 32k, batch 1 and 8 (eager dynamic, compiled static, HF's
#                                         StaticCache + torch.compile), and at 8k batch 1
# Each step runs under its own `timeout` (STEP_S seconds) so one slow bench cannot eat the others' time; every
# script writes its JSON after each measurement, so a stopped bench still returns what it measured. The ratios the
# issue asks for are printed by the scripts themselves; docs/performance.md quotes them with this commit.
set -uo pipefail
PHASE=${PHASE:?prefill|decode}
OUTDIR=${OUT:-runs/perf-out}
STEP_S=${STEP_S:-170}
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
mkdir -p "$OUTDIR"
git rev-parse HEAD 2>/dev/null > "$OUTDIR/commit.txt" || echo "no git" > "$OUTDIR/commit.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader >> "$OUTDIR/commit.txt" 2>&1
step() { local name=$1; shift; echo "=== $name: $*"; timeout "$STEP_S" "$@"; echo "=== $name exit $?"; }
case $PHASE in
  prefill)
    step gpu-tests python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu.py tests/test_gpu_decode.py \
      2>&1 | tail -n 15
    step stages python3 bench/namm_stages.py --preset gpu-7b --json "$OUTDIR/h200_namm_stages.json"
    step prefill python3 bench/namm_prefill.py --preset gpu-7b --lengths 8192,32768 \
      --json "$OUTDIR/h200_namm_prefill.json" ;;  # the preset's rows: native, full, recency, eager-namm and the NAMMs
  decode)
    step decode-b1-32k python3 bench/decode_speed.py --preset gpu-7b --batch 1 --lengths 32768 \
      --json "$OUTDIR/h200_decode_b1_32k.json"
    step decode-b8-32k python3 bench/decode_speed.py --preset gpu-7b --batch 8 --lengths 32768 \
      --json "$OUTDIR/h200_decode_b8_32k.json"
    step decode-b1-8k python3 bench/decode_speed.py --preset gpu-7b --batch 1 --lengths 8192 \
      --json "$OUTDIR/h200_decode_b1_8k.json" ;;
  *) echo "error: PHASE must be prefill or decode"; exit 2 ;;
esac
ls -la "$OUTDIR"
