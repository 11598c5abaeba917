#!/usr/bin/env bash
# The paper-path rehearsal (issue 21) on one GPU machine, from the repo root, in calls of at most ~9.5 minutes:
#
#   STOP=7.5 bash bench/rehearsal_gpu.sh      # the same line again resumes (finished runs are reused)
#
# 1. Writes the real-size random-weight stand-ins (bench/paper_standins.py: Meta-Llama-3-8B, LLaVA-NeXT-Video-7B-hf,
#    the three public DT folders, LongBench / LongVideoBench / MLVU / D4RL files) into $STANDINS unless there.
# 2. Runs `reproduce --preset full --config $STANDINS/paper-standins.json` (every domain, every policy of the
#    full preset, one random-NAMM control instead of five: its cost per row is that of any namm-random row)
#    with --max-minutes STOP; exit status 3 = stopped early, run the line again.
# 3. Copies what is worth keeping to $OUT: the report (with costs.md: seconds per example, peak memory, tokens
#    per example, kept fraction per run), the runs' small files as rehearsal-runs.tgz (carry it back into
#    $RUN on a fresh machine to resume there), nvidia-smi and the log.
# FROM=<a carried rehearsal-runs.tgz> resumes on a fresh machine (same code: the run keys hold its fingerprint).
# EMBEDDED=1 runs the embedded defaults instead of the stand-ins (no --config): the full preset of our own models on
# the GPU, e.g. `EMBEDDED=1 DOMAINS=video CONTROLS=5 STOP=8 bash bench/rehearsal_gpu.sh` for issue 19's 500 questions.
# DOMAINS (default lm,rl,video) is passed to --domains.
# TINY=1 writes the tiny stand-ins instead (a CPU check of this script). Carry .whl-rl (gymnasium + mujoco for the rl
# domain, as train/rl_gpu.sh does; `bash train/make_carried.sh` builds it).
set -uo pipefail
STANDINS=${STANDINS:-runs/standins}
RUN=${RUN:-runs/rehearsal}
STOP=${STOP:-7.5}
CONTROLS=${CONTROLS:-1}
OUTDIR=${OUT:-runs/rehearsal-out}
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
mkdir -p "$OUTDIR" "$RUN"
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || echo 'no nvidia-smi'; } | tee "$OUTDIR/nvidia-smi.txt"
. "$(dirname "$0")/../train/carried_packages.sh"  # gymnasium + mujoco for the rl domain travel in .whl-rl/
case ${DOMAINS:-rl} in *rl*) need_packages .whl-rl "$RUN/site" gymnasium mujoco || exit 3 ;; esac
if [ -n "${FROM:-}" ] && [ ! -d "$RUN/runs" ]; then tar xzf "$FROM" -C "$RUN"; fi  # a carried rehearsal-runs.tgz
config=()
if [ -z "${EMBEDDED:-}" ]; then
  if [ ! -f "$STANDINS/paper-standins.json" ]; then
    python3 bench/paper_standins.py --out "$STANDINS" ${TINY:+--tiny} 2>&1 | tee "$OUTDIR/standins.log" || exit 4
  fi
  echo "stand-ins ready after $(( $(date +%s) - t0 )) s" | tee -a "$OUTDIR/rehearsal.log"
  config=(--config "$STANDINS/paper-standins.json")
fi
left=$(python3 -c "print(max(0.5, $STOP - ($(date +%s) - $t0) / 60))")
python3 -m transfer.cli reproduce --preset full "${config[@]}" --domains "${DOMAINS:-lm,rl,video}" --out "$RUN" \
  --controls "$CONTROLS" --max-minutes "$left" 2>&1 | tee -a "$OUTDIR/rehearsal.log"
status=${PIPESTATUS[0]}
echo "reproduce exit status $status after $(( $(date +%s) - t0 )) s" | tee -a "$OUTDIR/rehearsal.log"
tar czf "$OUTDIR/rehearsal-runs.tgz" -C "$RUN" runs
if [ -d "$RUN/report" ] && [ "$status" = 0 ]; then tar czf "$OUTDIR/rehearsal-report.tgz" -C "$RUN" report; fi
ls -la "$OUTDIR"
exit "$status"
