#!/usr/bin/env bash
# Runs one action of one package: tools/pkg.sh <test|train|eval|demo> <package or alias> [args...]
# Aliases: omg -> omg_llava, claw -> clawmachine, vp -> vp_mllm; ivm, tldr, shared are themselves.
set -euo pipefail
action=$1; name=$2; shift 2
case "$name" in
  omg|omg_llava|omg-llava) pkg=omg_llava ;;
  claw|clawmachine) pkg=clawmachine ;;
  vp|vp_mllm|vp-mllm) pkg=vp_mllm ;;
  ivm|tldr|shared) pkg=$name ;;
  *) echo "unknown package '$name' (known: omg, claw, vp, ivm, tldr, shared)" >&2; exit 2 ;;
esac
PY=${PY:-.venv/bin/python}
if [ "$pkg" = shared ]; then dir=shared; else dir=packages/$pkg; fi

case "$action" in
  test)
    if [ ! -d "$dir/tests" ]; then
      echo "groundlab-$pkg has no tests yet: the package is scaffolded only and its issue is open." >&2
      exit 1
    fi
    exec "$PY" -m pytest "$dir/tests" -m "not gpu" "$@" ;;
  train|eval|demo)
    if [ "$pkg" = shared ]; then echo "shared has no $action target" >&2; exit 2; fi
    if [ ! -f "$dir/src/groundlab/$pkg/cli.py" ]; then
      echo "groundlab-$pkg: '$action' is not built yet (see $dir/README.md; its issue is open)." >&2
      exit 1
    fi
    exec "$PY" -m "groundlab.$pkg.cli" "$action" --config "$dir/configs/tiny.yaml" "$@" ;;
  *) echo "unknown action '$action' (test, train, eval, demo)" >&2; exit 2 ;;
esac
