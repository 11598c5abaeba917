#!/usr/bin/env bash
# Builds, from the package registry, what the GPU scripts carry to the device machine (whose image lacks these
# packages and has no network), into git-ignored folders of the repo root:
#   .whl-rl/site.tar.xz   gymnasium, mujoco (+ mujoco-core), farama-notifications, glfw and cma installed for the
#                         machine's Python 3.12 (x86-64) and xz-packed: ~6 MB instead of ~26 MB of wheels, which
#                         keeps the tree that travels (at most 64 MiB with everything carried) small enough.
#                         mujoco-studio (the viewer) and pyopengl are left out: simulation imports neither.
#   .whl-evo/cma-*.whl    cma alone (train/evolve_gpu.sh)
# Versions: constraints.txt's. Usage, from the repo root: bash train/make_carried.sh
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" constraints.txt | head -n 1; }
GYM=$(pin gymnasium); MJ=$(pin mujoco); CMA=$(pin cma)
MJV=${MJ#*==}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dl=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 -d "$tmp/whl")
"${dl[@]}" "$GYM" "$MJ" "mujoco-core==$MJV" farama-notifications glfw "$CMA"
python3 -m pip install -q --no-deps --no-compile --target "$tmp/site" --python-version 3.12 --implementation cp \
  --only-binary=:all: --platform manylinux_2_28_x86_64 "$tmp"/whl/*.whl
rm -f "$tmp"/site/mujoco/_simulate*.so  # the interactive viewer
mkdir -p .whl-rl .whl-evo
rm -f .whl-rl/* .whl-evo/*
tar cf - -C "$tmp/site" . | xz -9e -T2 > .whl-rl/site.tar.xz
cp "$tmp"/whl/cma-*.whl .whl-evo/
ls -la .whl-rl .whl-evo
