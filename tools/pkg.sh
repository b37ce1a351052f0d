#!/usr/bin/env bash
# Runs one action of one package: tools/pkg.sh <test|train|eval> <package or alias> [args...]
# A package is a folder of packages/ with a pyproject.toml (or shared); aliases: omg -> omg_llava,
# claw -> clawmachine, vp -> vp_mllm; dashes read as underscores (omg-llava).
set -euo pipefail
action=$1; name=$2; shift 2
case "$name" in
  omg) pkg=omg_llava ;;
  claw) pkg=clawmachine ;;
  vp) pkg=vp_mllm ;;
  *) pkg=${name//-/_} ;;
esac
if [ "$pkg" != shared ] && [ ! -f "packages/$pkg/pyproject.toml" ]; then
  known=$(cd packages && for d in */pyproject.toml; do printf '%s ' "${d%/pyproject.toml}"; done)
  echo "unknown package '$name' (known: shared ${known}and the aliases omg, claw, vp)" >&2; exit 2
fi
PY=${PY:-.venv/bin/python}
if [ "$pkg" = shared ]; then dir=shared; else dir=packages/$pkg; fi

case "$action" in
  test)
    if [ ! -d "$dir/tests" ]; then
      echo "groundlab-$pkg has no tests yet: the package is scaffolded only and its issue is open." >&2
      exit 1
    fi
    exec "$PY" -m pytest "$dir/tests" -m "not gpu" "$@" ;;
  train|eval)
    if [ "$pkg" = shared ]; then echo "shared has no $action target" >&2; exit 2; fi
    if [ ! -f "$dir/src/groundlab/$pkg/cli.py" ]; then
      echo "groundlab-$pkg: '$action' is not built yet (see $dir/README.md; its issue is open)." >&2
      exit 1
    fi
    exec "$PY" -m "groundlab.$pkg.cli" "$action" --config "$dir/configs/tiny.yaml" "$@" ;;
  *) echo "unknown action '$action' (test, train, eval)" >&2; exit 2 ;;
esac
