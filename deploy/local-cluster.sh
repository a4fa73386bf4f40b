#!/usr/bin/env bash
# A coordinator and N worker daemons on this machine, in the foreground:
# the quickest way to try scheduling, failover and sweeps without a
# cluster. Ctrl-C stops the workers (their trainers checkpoint and stop),
# then the coordinator; the state stays under $DATA for the next start.
#
#   deploy/local-cluster.sh [N]        N workers, 2 by default
#
# Settings (environment):
#   PORT=50051            the coordinator's port on 127.0.0.1
#   DATA=.data/local-cluster   coordinator state and worker folders
#   BIN_DIR=target/release     where the binaries are (make build-release)
#   CPU_SLOTS=1           CPU slots each worker offers
#   GPUS_PER_WORKER=0     CUDA devices each worker takes, in order
#                         (worker i gets devices i*K .. i*K+K-1)
# Then, in another shell:
#   export JEPA_COORDINATOR=http://127.0.0.1:50051
#   target/release/jepactl workers
#   target/release/jepactl submit --config deploy/run.toml --watch
set -euo pipefail
cd "$(dirname "$0")/.."
workers=${1:-2}
port=${PORT:-50051}
data=${DATA:-.data/local-cluster}
bin=${BIN_DIR:-target/release}
cpu_slots=${CPU_SLOTS:-1}
per_worker=${GPUS_PER_WORKER:-0}
url="http://127.0.0.1:$port"
case $workers in '' | *[!0-9]* | 0) echo "local-cluster: N must be a positive number, got '$workers'" >&2; exit 1 ;; esac
for name in jepa-coordinator jepa-worker jepactl; do
  [ -x "$bin/$name" ] || { echo "local-cluster: $bin/$name is missing; build with: cargo build --release --workspace --bins" >&2; exit 1; }
done
mkdir -p "$data"

pids=()
stop_all() {
  trap - EXIT INT TERM
  echo "local-cluster: stopping" >&2
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT
trap 'exit 130' INT TERM

"$bin/jepa-coordinator" --listen "127.0.0.1:$port" --data-dir "$data/coordinator" \
  2>>"$data/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do "$bin/jepactl" --coordinator "$url" version >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/jepactl" --coordinator "$url" version >/dev/null || { echo "local-cluster: the coordinator did not start; see $data/coordinator.log" >&2; exit 1; }

for ((i = 0; i < workers; i++)); do
  gpus=none
  if [ "$per_worker" -gt 0 ]; then
    gpus=$(seq -s, $((i * per_worker)) $((i * per_worker + per_worker - 1)))
  fi
  "$bin/jepa-worker" daemon --coordinator "$url" --name "local-$i" --cpu-slots "$cpu_slots" \
    --gpus "$gpus" --work-dir "$data/worker-$i" 2>>"$data/worker-$i.log" &
  pids+=($!)
done
sleep 1
"$bin/jepactl" --coordinator "$url" workers
echo "local-cluster: coordinator on $url, $workers worker(s); logs in $data/*.log; Ctrl-C stops all"
wait
