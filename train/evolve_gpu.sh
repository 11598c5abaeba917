#!/usr/bin/env bash
# Issue 17 on one H200 (kind nvidia-h200): population speed -> fitness noise -> three evolution seeds side by side,
# in back-to-back commands of at most 9.5 minutes (send each within the machine's 30 s idle window, or runs/ is gone;
# a run that left through $OUT resumes anywhere: carry its evo-runs.tgz as FROM). From the repo root, carrying .whl-evo
# (the cma wheel: `bash train/make_carried.sh` makes it) and, to resume, the folder holding evo-runs.tgz:
#   1. bash train/evolve_gpu.sh start    = bench (BENCH_S) + noise (NOISE_S) + evolve for what is left of EVO_MIN
#   2. bash train/evolve_gpu.sh evolve   again and again: every seed resumes where it stopped; then `pack`
# Phases:
#   bench   bench/population_speed.py at LENGTH tokens, the preset's rows per pass: sequences/s of the stacked
#           population against one update per member, side by side (population_speed.json).
#   noise   `evolve --measure-noise NOISE_DRAWS` on the preset: one member's fitness over fresh prompt draws against
#           the population's spread (noise.json); the preset's prompts are enough when the last stage's rank
#           correlation between draws is >= 0.5 (train/EVOLVE_8K.md, section 2).
#   evolve  one `evolve --preset PRESET --seeds S` process per seed in SEEDS, all on the one GPU (a 10.5 M-parameter
#           LM leaves it mostly idle: side by side they share it), each stopping after EVO_MIN minutes checkpointed;
#           every call prints each seed's stage, generation and fitness.
#   pack    evo-runs.tgz into $OUT: each seed's config.json, log.json, norm.json (enough to resume by replaying the
#           log: evolution.pkl, cma's 4172 x 4172 covariance, stays behind), fitness.png, namm*/, and the noise and
#           speed JSON; summary.txt beside it.
# CPU smoke test (tests/test_evolve_gpu_script.py): DEVICE=cpu PRESET=cpu-small with *_EXTRA options.
set -uo pipefail
phase=${1:?start|bench|noise|evolve|pack}
R=${EVO_RUNS:-runs/evo}
OUTDIR=${OUT:-$R/out}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-gpu-2k}
SEEDS=${SEEDS:-1 2 3}
EVO_MIN=${EVO_MIN:-8.6}
BENCH_S=${BENCH_S:-100}
NOISE_DRAWS=${NOISE_DRAWS:-3}
NOISE_S=${NOISE_S:-150}
LENGTH=${LENGTH:-2048}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
mkdir -p "$R" "$OUTDIR"

. "$(dirname "$0")/carried_packages.sh"  # the GPU image has no cma: its wheel travels in .whl-evo/
need_packages .whl-evo "$R/site" cma || exit 3
if [ -n "${FROM:-}" ] && [ -f "$FROM" ] && ! ls "$R"/seed-*/log.json >/dev/null 2>&1; then
  tar xzf "$FROM" -C "$R" && echo "resuming from $FROM: $(ls -d "$R"/seed-* | tr '\n' ' ')"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

progress() {  # each seed's last logged generation
  for s in $SEEDS; do
    f=$R/seed-$s/log.json
    [ -f "$f" ] && python3 - "$f" "$s" <<'PY'
import json, sys
log = json.load(open(sys.argv[1]))
if log:
    e = log[-1]
    keys = ("stage", "generation", "best_fitness", "mean_member_fitness", "mean_fitness", "mean_kept_fraction",
            "seconds")
    print(f"seed {sys.argv[2]}: {len(log)} generations;", ", ".join(f"{k} {e[k]:.4g}" if isinstance(e.get(k), float)
          else f"{k} {e[k]}" for k in keys if k in e))
PY
  done
}

do_bench() {
  timeout "$BENCH_S" python3 bench/population_speed.py --device "$DEVICE" --length "$LENGTH" \
    --max-seconds "$((BENCH_S - 20))" --json "$OUTDIR/population_speed.json" ${BENCH_EXTRA:-}
  echo "bench exit $?"
}

do_noise() {
  timeout "$NOISE_S" python3 -m transfer.cli evolve --preset "$PRESET" --measure-noise "$NOISE_DRAWS" \
    --out "$R/noise" --device "$DEVICE" ${EVO_EXTRA:-}
  echo "noise exit $?"
  [ -f "$R/noise/noise.json" ] && cp "$R/noise/noise.json" "$OUTDIR/noise.json"
}

do_evolve() {
  local minutes pids=() rc=0
  minutes=$(python3 -c "import sys; print(max(0.05, float(sys.argv[1]) - (float(sys.argv[2]) - float(sys.argv[3])) / 60))" \
            "$EVO_MIN" "$(date +%s)" "$T0")
  echo "evolve: seeds $SEEDS side by side for $minutes min"
  for s in $SEEDS; do
    python3 -m transfer.cli evolve --preset "$PRESET" --seeds "$s" --out "$R" --max-minutes "$minutes" \
      --device "$DEVICE" ${EVO_EXTRA:-} > "$R/evolve-$s.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  for s in $SEEDS; do echo "--- seed $s"; grep -v "^\s*$" "$R/evolve-$s.log" | tail -n 4; done
  progress | tee "$OUTDIR/progress.txt"
  return $rc
}

do_pack() {
  local keep=()
  for s in $SEEDS; do
    [ -d "$R/seed-$s" ] || continue
    for f in config.json log.json norm.json fitness.png; do [ -f "$R/seed-$s/$f" ] && keep+=("seed-$s/$f"); done
    keep+=($(cd "$R" && ls -d seed-"$s"/namm seed-"$s"/namm-stage* 2>/dev/null))
  done
  [ -f "$R/fitness_seeds.png" ] && keep+=(fitness_seeds.png)
  [ -f "$R/noise/noise.json" ] && keep+=(noise/noise.json)
  [ "${#keep[@]}" -gt 0 ] || { echo "error: nothing to pack in $R"; return 4; }
  tar czf "$OUTDIR/evo-runs.tgz" -C "$R" "${keep[@]}"
  { progress; ls -la "$OUTDIR"; } > "$OUTDIR/summary.txt"
  cat "$OUTDIR/summary.txt"
  local n
  n=$(ls "$OUTDIR" | wc -l)
  [ "$n" -le 8 ] || { echo "error: $n files in \$OUT (at most 8 come back)"; return 4; }
}

case $phase in
  start)  do_bench; do_noise; do_evolve; status=$?; do_pack || status=4; exit $status ;;
  bench)  do_bench ;;
  noise)  do_noise ;;
  evolve) do_evolve; status=$?; do_pack || status=4; exit $status ;;
  pack)   do_pack ;;
  *)      echo "error: unknown phase $phase (start|bench|noise|evolve|pack)"; exit 2 ;;
esac
