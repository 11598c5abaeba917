#!/usr/bin/env bash
# The one device call that trained the shipped DTs (artifacts/rl/dt-*): three runs side by side on one GPU,
# each capped at MINUTES of training. Usage on the GPU machine: OUT=/some/dir bash artifacts/rl/train_dts_gpu.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
MINUTES=${MINUTES:-5.5}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for env in hopper halfcheetah walker2d; do
  python -m train.dt --data "artifacts/rl/data/$env-medium-v5.hdf5" --env "$env" --out "$WORK/dt-$env" \
    --context 64 --hidden 128 --layers 3 --heads 1 --steps 30000 --batch-size 256 --lr 6e-4 --warmup 1000 \
    --weight-decay 1e-4 --grad-clip 0.25 --seed 0 --device cuda --max-minutes "$MINUTES" \
    --log-every 1000 --ckpt-every 1000000 > "$WORK/train-$env.log" 2>&1 &
done
wait
tail -n 4 "$WORK"/train-*.log
tar czf "$OUT/dt-runs.tgz" -C "$WORK" .
