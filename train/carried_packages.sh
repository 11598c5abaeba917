# Sourced by the GPU scripts (train/rl_gpu.sh, train/evolve_gpu.sh, bench/rehearsal_gpu.sh): make Python packages
# that the GPU image lacks importable from what the device call carried, without a network.
#   need_packages DIR SITE MODULE...   if any MODULE fails to import, install DIR's packages into SITE (once) and
#                                      put SITE on PYTHONPATH; DIR holds either site.tar.xz (the packages already
#                                      installed for the machine's Python by `pip install --target` and packed with
#                                      `tar cJ`: a third of the wheels' size, which keeps the tree that travels under
#                                      the device tool's 64 MiB) or *.whl files. Returns 3 with one error line if
#                                      the modules still do not import.
need_packages() {
  local dir=$1 site=$2; shift 2
  local check="import $(IFS=,; echo "$*")"
  python3 -c "$check" 2>/dev/null && return 0
  if [ ! -f "$site/.done" ]; then
    mkdir -p "$site"
    if [ -f "$dir/site.tar.xz" ]; then tar xJf "$dir/site.tar.xz" -C "$site" && touch "$site/.done"
    elif ls "$dir"/*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --target "$site" "$dir"/*.whl && touch "$site/.done"
    fi
  fi
  case ":${PYTHONPATH:-}:" in *":$PWD/$site:"*) ;; *) export PYTHONPATH=$PWD/$site${PYTHONPATH:+:$PYTHONPATH} ;; esac
  python3 -c "$check" 2>/dev/null || { echo "error: cannot import $* (carry $dir with site.tar.xz or wheels)"; return 3; }
}
