#!/usr/bin/env bash
# The exact GPU commands behind artifacts/lm/llama-8k-recall (run from the repo root on a 2-GPU H200 host).
#   phase1: train from scratch for STOP minutes (default 9); the checkpoint stays in runs/lmsrc/ckpt.
#   phase2: resume for STOP minutes (default 5), save bf16 weights, held-out eval (full | 25 % recency) on 2 GPUs.
# TRAIN_EXTRA / EVAL_EXTRA (word-split, appended) override arguments, e.g. for a CPU smoke test of this script.
# Outputs worth keeping are copied to $OUT (model.pt split in 15 MB parts: join with `cat model.pt.part* >model.pt`).
set -uo pipefail
phase=${1:?phase1|phase2}
STOP=${2:-}
OUTDIR=${OUT:-runs/lmsrc/out}
mkdir -p runs/lmsrc "$OUTDIR"
NPROC=$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')
ARGS=(--out runs/lmsrc/model --ckpt-dir runs/lmsrc/ckpt
      --tasks niah_multikey mqar vt fwe fwe_decoy count passage copy
      --layers 6 --hidden 384 --heads 8 --kv-heads 4 --intermediate 1024 --rope-theta 500000 --max-positions 8192
      --lengths 256 512 1024 2048 4096 8192 --advance-acc 0.75 --min-stage-steps 150 --max-stage-steps 900
      --batch-tokens 65536 --lr 1.5e-3 --warmup 300 --train-minutes 13.5 --steps 1000000 --workers 6
      --log-every 100 --ckpt-every 1000 --eval-n 0 --seed 0)
export PYTHONUNBUFFERED=1

ship_ckpt() {
  cp runs/lmsrc/ckpt/state.json runs/lmsrc/model/train_log.jsonl "$OUTDIR"/
  split -b 15M -d runs/lmsrc/ckpt/model.pt "$OUTDIR"/model.pt.part
}

if [ "$phase" = phase1 ]; then
  python3 -m torch.distributed.run --nproc-per-node "$NPROC" -m train.lm "${ARGS[@]}" --stop-minutes "${STOP:-9}" ${TRAIN_EXTRA:-}
  ship_ckpt
elif [ "$phase" = phase2 ]; then
  test -f runs/lmsrc/ckpt/state.json || { echo "no checkpoint on this machine"; exit 3; }
  python3 -m torch.distributed.run --nproc-per-node "$NPROC" -m train.lm "${ARGS[@]}" --resume --stop-minutes "${STOP:-5}" ${TRAIN_EXTRA:-}
  ship_ckpt
  EV=(--model runs/lmsrc/model --lengths 8192 4096 2048 --n 100 --batch-size 25 --budget 0.25)
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m train.lm_heldout "${EV[@]}" --policies full --out "$OUTDIR"/heldout_full.json ${EVAL_EXTRA:-} &
  CUDA_VISIBLE_DEVICES=$((NPROC - 1)) timeout 200 python3 -m train.lm_heldout "${EV[@]}" --policies recency --out "$OUTDIR"/heldout_recency.json ${EVAL_EXTRA:-} &
  wait
else
  echo "unknown phase $phase"; exit 2
fi
