#!/usr/bin/env bash
# The demo: checks libtorch, then pretrains a small EC-IJEPA and an I-JEPA
# encoder on Fashion-MNIST with the embedded default spec, probes both, and
# prints a table. About 5 minutes on two idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${JEPA_WORKER:-target/release/jepa-worker}
out=${OUT:-out/demo}
steps=${DEMO_STEPS:-300}
mkdir -p "$out"

"$bin" info
echo
for method in ec none; do
  echo "== pretraining conditioning=$method for $steps steps (metrics: $out/$method.jsonl)"
  "$bin" train --json --set "conditioning.kind=$method" --set "name=demo-$method" \
    --set "schedule.steps=$steps" --set schedule.log_every=50 --set schedule.rankme_every=100 \
    --set eval.max_train=5000 --set eval.max_test=2000 \
    --out "$out/$method" | tee "$out/$method.jsonl" | grep -E '"kind":"(step|eval)"' | cut -c1-160
done

echo
printf '| method | final loss | linear-probe top-1 |\n|---|---|---|\n'
for method in ec none; do
  loss=$(grep '"kind":"step"' "$out/$method.jsonl" | tail -n 1 | sed 's/.*"loss_avg":\([0-9.e-]*\).*/\1/')
  top1=$(grep '"kind":"eval"' "$out/$method.jsonl" | tail -n 1 | sed 's/.*"top1":\([0-9.]*\).*/\1/')
  label=$([ "$method" = ec ] && echo EC-IJEPA || echo I-JEPA)
  printf '| %s | %.4f | %.2f %% |\n' "$label" "$loss" "$(awk -v v="$top1" 'BEGIN { print 100 * v }')"
done
