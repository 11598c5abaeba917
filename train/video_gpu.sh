#!/usr/bin/env bash
# GPU commands for the long-video LLaVA-NeXT-Video (issue 19 item 1), from the repo root on one H200
# (kind nvidia-h200: 16 cores, so 14 data-loader processes render the training stream beside the GPU).
#   train  : from scratch. Probes the step time of each curriculum stage, fits the schedule into STOP
#            minutes (default 6.5), validates every 500 steps (the model is chosen on validation only), then
#            scores the TEST set once: full cache and 25 % recency (protect 32) through the suite's memory,
#            paired bootstrap over videos. About 9 device minutes: ~0.5 start-up, 6.5 training, 1-2 test evaluation.
#   resume : continue a run cut short (train_state.pt in runs/video/long, or its .partNN pieces in $FROM,
#            e.g. a carried copy of the previous $OUT); the step count stays the first call's.
#   more   : if the targets were missed, a second run warm-started from a model folder INIT (the previous
#            $OUT's model.tar.gz, unpacked into a carried folder), last stage only, lower lr.
# $OUT receives model.tar.gz (the validation-chosen model with train_metrics.json and PROVENANCE.md),
# train_state.pt.partNN (15 MiB pieces), train_log.jsonl and train_metrics.json: at most 8 files.
# The full state (fp32 weights + Adam moments) is ~12 MB: with the 56 MiB tracked tree it does not fit the
# 64 MiB a call may carry, so `resume` works on a still-warm machine (or once the tree is smaller);
# `more` needs only the ~4 MB model and always fits.
set -uo pipefail
phase=${1:?train|resume|more}
STOP=${STOP:-6.5}
OUTDIR=${OUT:-runs/video/long-out}
RUN=${RUN:-runs/video/long}
export PYTHONUNBUFFERED=1
WORKERS=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
COMMON=(--task long --device cuda --workers "$WORKERS" --frame-budget 2048 --warmup 200 --eval-every 500
        --save-every 500 --log-every 50 --seed 7 --export "$OUTDIR" --max-minutes "$STOP")
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
case $phase in
  train)  python3 -m train.video "${COMMON[@]}" --out "$RUN" --steps 0 --lr 1e-3 ;;
  resume) python3 -m train.video "${COMMON[@]}" --out "$RUN" --steps 0 --resume ${FROM:+--resume-from "$FROM"} ;;
  more)   test -f "${INIT:?INIT=model folder}/model.safetensors" || { echo "error: no model in $INIT"; exit 3; }
          python3 -m train.video "${COMMON[@]}" --out "${RUN}-more" --steps 0 --lr 3e-4 --init "$INIT" \
            --curriculum "64,80,96,112,128/-2,0,64,128/0" ;;
  *)      echo "error: unknown phase $phase (train|resume|more)"; exit 2 ;;
esac
status=$?
ls -la "$OUTDIR"
exit $status
