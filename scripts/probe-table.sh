#!/usr/bin/env bash
# Linear-probe comparison on Fashion-MNIST: raw pixels, a randomly
# initialised encoder, I-JEPA and EC-IJEPA pretrained, for each seed, with
# one probe protocol (the spec's [eval] section, plus the pooled probe with
# kernel 3 and stride 2). Prints a Markdown table; each cell is
# "average-pooled probe / pooled probe" top-1 in percent.
#
#   scripts/probe-table.sh [STEPS] [SEEDS...]      e.g. scripts/probe-table.sh 600 0 1
#
# Runs go under ${OUT:-out/probe-table}; each pretraining run's JSON lines
# are kept there beside its checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-600}
shift || true
seeds=("${@:-0 1}")
[ "${#seeds[@]}" -gt 0 ] || seeds=(0 1)
read -r -a seeds <<<"${seeds[*]}"
out=${OUT:-out/probe-table}
bin=${JEPA_WORKER:-target/release/jepa-worker}
mkdir -p "$out"
common=(--set "schedule.steps=$steps" --set schedule.log_every=50 --set schedule.rankme_every=0
        --set eval.max_train=10000 --set eval.max_test=10000
        --set eval.pooled_kernel=3 --set eval.pooled_stride=2)

# "AVG POOLED" top-1 of the last probe line read on stdin ("-" when absent).
top1() {
  local line avg pooled
  line=$(tail -n 1)
  avg=$(sed -n 's/.*"top1":\([0-9.]*\).*/\1/p' <<<"$line")
  pooled=$(sed -n 's/.*"pooled_top1":\([0-9.]*\).*/\1/p' <<<"$line")
  echo "${avg:--} ${pooled:--}"
}
pct() { if [ "$1" = - ]; then printf -- -; else awk -v v="$1" 'BEGIN { printf "%.2f", 100 * v }'; fi; }

declare -A result
for seed in "${seeds[@]}"; do
  result[raw,$seed]=$("$bin" probe --features raw --set "seed=$seed" "${common[@]}" 2>/dev/null | grep top1 | top1)
  result[random,$seed]=$("$bin" probe --features random --set "seed=$seed" "${common[@]}" 2>/dev/null | grep top1 | top1)
  for method in none ec; do
    name="$method-seed$seed"
    start=$(date +%s)
    "$bin" train --json --set "seed=$seed" --set "conditioning.kind=$method" --set "name=$name" \
      "${common[@]}" --out "$out/$name" >"$out/$name.jsonl" 2>"$out/$name.log"
    echo "$name: $(( $(date +%s) - start )) s" >&2
    result[$method,$seed]=$(grep '"kind":"eval"' "$out/$name.jsonl" | top1)
  done
done

printf '| features |'; for s in "${seeds[@]}"; do printf ' seed %s |' "$s"; done; printf ' mean |\n'
printf '|---|'; for _ in "${seeds[@]}"; do printf '%s' '---|'; done; printf '%s\n' '---|'
for row in raw random none ec; do
  case $row in
    raw) label="raw pixels" ;; random) label="random encoder" ;;
    none) label="I-JEPA, $steps steps" ;; ec) label="EC-IJEPA, $steps steps" ;;
  esac
  printf '| %s |' "$label"
  sum_a=0 sum_p=0
  for s in "${seeds[@]}"; do
    read -r a p <<<"${result[$row,$s]}"
    printf ' %s / %s |' "$(pct "$a")" "$(pct "$p")"
    sum_a=$(awk -v x="$sum_a" -v y="$a" 'BEGIN { print x + y }')
    [ "$p" = - ] || sum_p=$(awk -v x="$sum_p" -v y="$p" 'BEGIN { print x + y }')
  done
  n=${#seeds[@]}
  mean_p=-
  [ "$p" = - ] || mean_p=$(awk -v x="$sum_p" -v n="$n" 'BEGIN { print x / n }')
  printf ' %s / %s |\n' "$(pct "$(awk -v x="$sum_a" -v n="$n" 'BEGIN { print x / n }')")" "$(pct "$mean_p")"
done
