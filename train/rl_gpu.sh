#!/usr/bin/env bash
# Issue 18 on one H200 (kind nvidia-h200, 16 cores) in ONE warm lease: SAC-family experts -> D4RL-style datasets ->
# Decision Transformers -> their evaluation, in three back-to-back commands of at most 9.5 minutes each (send each
# within 30 s of the last, or the machine and runs/ are gone), from the repo root, carrying .whl-rl
# (`bash train/make_carried.sh` builds it: gymnasium + mujoco packed for the GPU machine's Python):
#   1. bash train/rl_gpu.sh sac      TQC on hopper, halfcheetah, walker2d side by side for SAC_MIN (8.6) minutes
#   2. bash train/rl_gpu.sh sac      the same command again: resumes bit-exactly from runs/rl-gpu/sac/<env>-s0/ckpt
#   3. bash train/rl_gpu.sh finish   = data, dt, eval, pack (about 8 minutes; each phase can also be run alone)
# Phases:
#   sac    train.sac (TQC, 5 critics x 25 quantiles, --train-freq 32, --unroll 4, eval every 20k steps; resumes
#          when a checkpoint exists); $OUT gets the evaluation curves and logs (sac-logs.tgz).
#   data   envs.d4rl_datasets per env: expert (best snapshot), medium (snapshot nearest MEDIUM_FRAC = 1/3 of the
#          expert's evaluation, D4RL's definition), medium-replay (replay buffer up to medium), 1000-step episodes,
#          DATA_MB (1.9) float32 MB a file: ~30k hopper / ~20k halfcheetah, walker2d steps.
#   dt     15 DTs side by side for DT_MIN minutes each: K=20 (hidden 128, 3 layers, 1 head, tanh: the public
#          checkpoints' sizes) on each env's medium set, seeds 0,1,2, target = the best return in the data
#          (--target-rule data-max); and K=200 on the position-only variant (--obs pos, velocities removed) of the
#          same medium set, seed 0: the memory-dependent model; and K=64 on the full observations, seed 0 (budgets
#          in steps below its context against windows of the same sizes). Weights ship in float16 (--save-dtype:
#          15 agents of ~0.9 M parameters would otherwise add ~50 MB to a repository whose whole tree must stay
#          under the device tool's 64 MiB); every evaluation scores the rounded weights.
#   eval   eval rl (float64 rollouts, 20 episodes of 1000 steps, env seeds 0-19, the same for every model and
#          row): K=20 models, full cache and sliding window (K=20), the three seeds pooled per env; K=200 pos
#          models, full cache, sliding window K=200 and short windows of WINDOWS steps (the memory check).
#          Each env runs in its own process under `timeout EVAL_S`; run dirs are resumable on any machine.
#   pack   everything worth keeping into $OUT: rl-gpu.tgz.NN (15 MiB parts; join with
#          `cat rl-gpu.tgz.* | tar xzf -`) + summary.txt: at most 8 files.
# Timeline (numbers measured on this H200 with 3 TQC processes side by side: ~800 env steps/s per env at
# --train-freq 32; the first 20k steps took ~150 s, of which most was compiling the fully unrolled 32-step scan,
# which took 78 s on the 2-core CPU against 9.7 s with --unroll 4 at the same speed per step):
#   call 1: wheels ~10 s, start ~60 s, then ~8.5 min at 800 steps/s -> ~0.4M steps per env
#   call 2: restore + compile (cached in runs/rl-gpu/jax-cache) ~20 s, ~8.6 min -> ~0.8M steps per env
#   call 3: data ~30 s, dt DT_MIN=5 min (+~20 s start), eval <= EVAL_S=120 s, pack ~10 s -> ~8 min
# If a call finds no checkpoint (the machine was lost), `sac` starts over; `finish` needs the runs of calls 1-2.
# CPU smoke test (tests/test_rl_gpu_script.py runs it with tiny settings): DEVICE=cpu and the *_EXTRA variables.
set -uo pipefail
phase=${1:?sac|finish|data|dt|eval|pack}
R=${RL_RUNS:-runs/rl-gpu}
OUTDIR=${OUT:-$R/out}
DEVICE=${DEVICE:-cuda}
ENVS=${ENVS:-hopper halfcheetah walker2d}
SEEDS=${SEEDS:-0 1 2}
SAC_MIN=${SAC_MIN:-8.6}
DT_MIN=${DT_MIN:-5.0}
EVAL_S=${EVAL_S:-120}
DATA_MB=${DATA_MB:-1.9}
MEDIUM_FRAC=${MEDIUM_FRAC:-0.3333333}
WINDOWS=${WINDOWS:-8,16,32}
BUDGETS=${BUDGETS:-24t,48t,96t}  # the windows' sizes in tokens (R, s, a per step)
EPISODES=${EPISODES:-20}
MAX_STEPS=${MAX_STEPS:-1000}
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$R/jax-cache}
mkdir -p "$R" "$OUTDIR"

# gymnasium + mujoco: the GPU image has neither; they travel in .whl-rl/ (site.tar.xz or wheels)
. "$(dirname "$0")/carried_packages.sh"
need_packages .whl-rl "$R/site" gymnasium mujoco || exit 3
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c 'import gymnasium, mujoco, torch; print("gymnasium", gymnasium.__version__, "mujoco", mujoco.__version__, "torch", torch.__version__)'

scores() {  # the last and best evaluation of each SAC run, D4RL-normalised
  for env in $ENVS; do
    f=$R/sac/$env-s0/log.csv
    [ -f "$f" ] && python3 - "$f" "$env" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
if rows:
    best = max(rows, key=lambda r: float(r["eval_return"]))
    print(f"{sys.argv[2]}: step {rows[-1]['step']} D4RL {rows[-1]['d4rl_score']} (best {best['d4rl_score']} at step "
          f"{best['step']}), {rows[-1]['sps']} steps/s")
EOF
  done
}

do_sac() {
  python3 -m train.sac --env $ENVS --out "$R/sac" --steps 1000000 --train-freq 32 --unroll 4 --eval-every 20000 \
    --max-minutes "$SAC_MIN" ${SAC_EXTRA:-}
  local rc=$?
  tail -n 3 "$R"/sac/*.log
  scores | tee "$OUTDIR/sac-scores.txt"
  tar czf "$OUTDIR/sac-logs.tgz" -C "$R" --exclude='ckpt' --exclude='snapshots' sac
  return $rc
}

do_data() {
  local pids=() rc=0
  for env in $ENVS; do
    python3 -m envs.d4rl_datasets "$R/sac/$env-s0" --out "$R/data" --max-file-mb "$DATA_MB" \
      --medium-frac "$MEDIUM_FRAC" > "$R/data-$env.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  cat "$R"/data-*.log
  return $rc
}

do_dt() {
  local pids=() rc=0
  mkdir -p "$R/dt"
  for env in $ENVS; do
    local data=$R/data/$env-medium-v5.hdf5
    [ -f "$data" ] || { echo "error: no $data: no DTs for $env"; rc=1; continue; }
    for seed in $SEEDS; do
      python3 -m train.dt --data "$data" --out "$R/dt/dt-$env-k20-s$seed" --context 20 --hidden 128 --layers 3 \
        --heads 1 --target-rule data-max --steps 100000 --batch-size 256 --lr 6e-4 --warmup 1000 --seed "$seed" \
        --device "$DEVICE" --threads 1 --max-minutes "$DT_MIN" --log-every 1000 --ckpt-every 1000000 --save-dtype float16 ${DT_EXTRA:-} \
        > "$R/dt/train-$env-k20-s$seed.log" 2>&1 &
      pids+=($!)
    done
    python3 -m train.dt --data "$data" --out "$R/dt/dt-$env-k64-s0" --context 64 --hidden 128 --layers 3 --heads 1 \
      --target-rule data-max --steps 100000 --batch-size 256 --lr 6e-4 --warmup 1000 --seed 0 --device "$DEVICE" \
      --threads 1 --max-minutes "$DT_MIN" --log-every 1000 --ckpt-every 1000000 --save-dtype float16 ${DT_EXTRA:-} \
      > "$R/dt/train-$env-k64-s0.log" 2>&1 &
    pids+=($!)
    python3 -m train.dt --data "$data" --out "$R/dt/dt-$env-pos-k200-s0" --obs pos --context 200 --hidden 128 \
      --layers 3 --heads 1 --target-rule data-max --steps 100000 --batch-size 256 --lr 6e-4 --warmup 1000 --seed 0 \
      --device "$DEVICE" --threads 1 --max-minutes "$DT_MIN" --log-every 1000 --ckpt-every 1000000 --save-dtype float16 ${DT_EXTRA:-} \
      > "$R/dt/train-$env-pos-k200-s0.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  tail -n 2 "$R"/dt/train-*.log
  return $rc
}

do_eval() {
  local pids=() rc=0 seeds
  seeds=$(echo $SEEDS | tr ' ' ',')
  local common=(--episodes "$EPISODES" --max-steps "$MAX_STEPS" --policies full --batch-size "$EPISODES"
                --device "$DEVICE" ${EVAL_EXTRA:-})
  for env in $ENVS; do
    timeout "$EVAL_S" python3 -m transfer.cli eval rl --env "$env" --model "$R/dt/dt-{env}-k20-s{seed}" \
      --train-seeds "$seeds" --out "$R/eval/k20" "${common[@]}" > "$R/eval-$env-k20.log" 2>&1 &
    pids+=($!)
    # issue 18 (a): budgets in steps below a K=64 model's context against windows of the same sizes, the
    # rl-memory preset's schedule (eval/reproduce.py: every 48 tokens, the newest step protected)
    timeout "$EVAL_S" python3 -m transfer.cli eval rl --env "$env" --model "$R/dt/dt-{env}-k64-s{seed}" \
      --train-seeds 0 --window-steps "$WINDOWS" --budget "$BUDGETS" --policies full,recency,namm,h2o \
      --update-interval 48 --protect-recent 3 --out "$R/eval/k64" --episodes "$EPISODES" --max-steps "$MAX_STEPS" \
      --batch-size "$EPISODES" --device "$DEVICE" ${EVAL_EXTRA:-} > "$R/eval-$env-k64.log" 2>&1 &
    pids+=($!)
    timeout "$EVAL_S" python3 -m transfer.cli eval rl --env "$env" --model "$R/dt/dt-{env}-pos-k200-s{seed}" \
      --train-seeds 0 --window-steps "$WINDOWS" --out "$R/eval/pos-k200" "${common[@]}" \
      > "$R/eval-$env-pos.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  cat "$R"/eval-*.log | grep -v "^\s*$" | tail -n 80
  return $rc
}

do_pack() {
  # the SAC checkpoints (replay buffers, ~0.1 GB per env) stay behind; the expert/medium actor snapshots travel
  local keep=()
  for env in $ENVS; do
    keep+=("sac/$env-s0/log.csv" "sac/$env-s0/config.json" "sac/$env.log")
    local summary=$R/data/$env-v5-summary.json
    [ -f "$summary" ] && for s in $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
        print(d['expert_step'], d['medium_step'])" "$summary"); do
      keep+=("sac/$env-s0/snapshots/step_$(printf %08d "$s").npz")
    done
  done
  for d in data dt eval; do [ -d "$R/$d" ] && keep+=("$d"); done
  mapfile -t keep < <(printf '%s\n' "${keep[@]}" | awk '!seen[$0]++')  # medium may be the expert snapshot
  keep+=($(cd "$R" && ls data-*.log eval-*.log 2>/dev/null))
  (cd "$R" && ls -d "${keep[@]}" >/dev/null) || echo "warning: some files to pack are missing"
  tar czf - -C "$R" --exclude='*.partial' --ignore-failed-read "${keep[@]}" | split -b 15m -d - "$OUTDIR/rl-gpu.tgz."
  { scores; for f in "$R"/dt/dt-*/summary.json; do
      [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
print(sys.argv[1].split('/')[-2], d['steps_done'], 'steps', round(d['train_wall_s']), 's, loss', \
round(d['final_loss_mean_100'], 4), ', target', d['target_return'])" "$f"; done
    grep -h -A12 "D4RL-normalised score" "$R"/eval-*.log 2>/dev/null; } > "$OUTDIR/summary.txt"
  local n
  n=$(ls "$OUTDIR" | wc -l)
  ls -la "$OUTDIR"
  [ "$n" -le 8 ] || { echo "error: $n files in \$OUT (at most 8 come back); raise the part size or drop files"; return 4; }
}

case $phase in
  sac)    do_sac ;;
  data)   do_data ;;
  dt)     do_dt ;;
  eval)   do_eval ;;
  pack)   do_pack ;;
  finish) status=0  # every phase runs even if an earlier one failed for one env: the others still come back
          do_data || status=1; do_dt || status=1; do_eval || status=1; do_pack || status=4
          exit $status ;;
  *)      echo "error: unknown phase $phase (sac|finish|data|dt|eval|pack)"; exit 2 ;;
esac
