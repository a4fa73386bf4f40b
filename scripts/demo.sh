#!/usr/bin/env bash
# The demo, end to end through the product: starts a coordinator (sled
# state under $DEMO_DATA/coordinator) and one worker daemon, submits an
# EC-IJEPA and an I-JEPA run on Fashion-MNIST through the gRPC API (with
# jepactl), shows their progress while they train side by side, and prints
# a table of final loss and linear-probe top-1 read back from the
# coordinator's metrics. The processes are shut down at the end; the
# coordinator's data stays, so the runs can be queried again later.
#
#   scripts/demo.sh          (make demo builds the release binaries first)
#
# Settings: DEMO_STEPS (300), DEMO_PORT (50061), DEMO_DATA (.data/demo),
# BIN_DIR (target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN_DIR:-target/release}
steps=${DEMO_STEPS:-300}
port=${DEMO_PORT:-50061}
data=${DEMO_DATA:-.data/demo}
url="http://127.0.0.1:$port"
export JEPA_COORDINATOR=$url
mkdir -p "$data"
start_time=$(date +%s)

for name in jepa-coordinator jepa-worker jepactl; do
  [ -x "$bin/$name" ] || { echo "demo: $bin/$name is missing; run make demo" >&2; exit 1; }
done
jepactl() { "$bin/jepactl" "$@"; }
# A field of jepactl's JSON output, e.g. `json_field run.state`.
json_field() { python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1].split("."):
    value = value[key]
print(value)' "$1"; }
run_state() { jepactl -o json get "$1" | json_field run.state; }

pids=()
cleanup() {
  # Worker first: it stops its trainers and reports; then the coordinator.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if jepactl version >/dev/null 2>&1; then
  echo "demo: something already serves $url; stop it or set DEMO_PORT" >&2
  exit 1
fi

echo "== coordinator on $url (state: $data/coordinator, log: $data/coordinator.log)"
"$bin/jepa-coordinator" --listen "127.0.0.1:$port" --data-dir "$data/coordinator" \
  2>"$data/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do jepactl version >/dev/null 2>&1 && break; sleep 0.1; done
jepactl version

echo "== worker daemon (2 CPU slots; log: $data/worker.log)"
"$bin/jepa-worker" daemon --coordinator "$url" --name demo-worker --cpu-slots 2 \
  --work-dir "$data/worker" 2>"$data/worker.log" &
pids+=($!)
for _ in $(seq 100); do jepactl workers 2>/dev/null | grep -q demo-worker && break; sleep 0.1; done
jepactl workers

echo "== submitting EC-IJEPA and I-JEPA, $steps steps each"
stamp=$(date +%m%d-%H%M%S)
ids=()
for method in ec none; do
  id=$(jepactl -o json submit --name "demo-$stamp-$method" \
    --set "conditioning.kind=$method" --set "schedule.steps=$steps" \
    --set optim.warmup_steps=$((steps / 20)) --set schedule.log_every=10 \
    --set schedule.checkpoint_every=100 --set schedule.rankme_every=100 \
    --set eval.max_train=5000 --set eval.max_test=2000 | json_field id)
  [ -n "$id" ] || { echo "demo: submitting $method failed" >&2; exit 1; }
  ids+=("$id")
done
echo "runs: ${ids[*]}"

echo "== progress (every 15 s; the last minute of each run is its linear probe)"
while :; do
  sleep 15
  jepactl list --name "demo-$stamp-" --limit 2 | grep -v '^more:' | sed "s/^/[$(( $(date +%s) - start_time )) s] /"
  unfinished=0
  for id in "${ids[@]}"; do
    state=$(run_state "$id")
    case $state in succeeded | failed | cancelled) ;; *) unfinished=1 ;; esac
  done
  [ "$unfinished" = 0 ] && break
done

# The newest point of one series of a run, from the coordinator's metrics.
last_value() {
  jepactl metrics "$1" --series "$2" --format csv | tail -n +2 | tail -n 1 | cut -d, -f3
}

echo
echo "== results (from the coordinator's metrics)"
printf '| method | run | state | final loss | linear-probe top-1 |\n|---|---|---|---|---|\n'
for i in 0 1; do
  id=${ids[$i]}
  label=$([ "$i" = 0 ] && echo EC-IJEPA || echo I-JEPA)
  state=$(run_state "$id")
  loss=$(last_value "$id" train/loss_avg)
  top1=$(last_value "$id" eval/probe_top1)
  printf '| %s | %s | %s | %s | %s |\n' "$label" "$id" "$state" \
    "$([ -n "$loss" ] && printf '%.4f' "$loss" || echo -)" \
    "$([ -n "$top1" ] && awk -v v="$top1" 'BEGIN { printf "%.2f %%", 100 * v }' || echo -)"
done
echo
echo "demo finished in $(( $(date +%s) - start_time )) s."
echo "The coordinator's state stays in $data/coordinator. To query the runs again:"
echo "  $bin/jepa-coordinator --listen 127.0.0.1:$port --data-dir $data/coordinator &"
echo "  $bin/jepactl --coordinator $url list"
