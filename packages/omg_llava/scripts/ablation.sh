#!/usr/bin/env bash
# The paper's Table 5 at toy scale: after `make train-omg`, retrain stages 1 and 2 on the same exported data
# and the same frozen segmenter, once without the perception prior and once without object-centric tokens.
# Results: runs/omg_llava/tiny_no_prior/metrics.json and runs/omg_llava/tiny_no_objects/metrics.json.
set -euo pipefail
cd "$(dirname "$0")/../../.."
runs=${GROUNDLAB_RUNS:-runs}
seg=$(ls -d "$runs"/omg_llava/tiny/segmenter-*/model 2>/dev/null | head -1 || true)
data=$(ls -d "$runs"/omg_llava/tiny/data-* 2>/dev/null | head -1 || true)
[ -n "$seg" ] && [ -n "$data" ] || { echo "run 'make train-omg' first (no segmenter / data under $runs/omg_llava/tiny)" >&2; exit 1; }
for arm in no_prior no_objects; do
  case $arm in
    no_prior) flag="--model.use_prior false" ;;
    no_objects) flag="--model.use_object_tokens false" ;;
  esac
  .venv/bin/groundlab-omg-llava train --config packages/omg_llava/configs/tiny.yaml --name "tiny_$arm" \
    --segmenter.pretrained "$seg" --data.root "$data" $flag \
    --stage1.progress_bar false --stage2.progress_bar false
done
