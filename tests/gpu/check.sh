#!/usr/bin/env bash
# The GPU checks, for a session that is lent the device machine (see the
# shared GPU.md). Prepare here, run there:
#
#   here:   cargo build --release -p jepa-worker && mkdir -p .gpu &&
#           cp target/release/jepa-worker tests/gpu/check.sh .gpu/ &&
#           cp -r /usr/share/datasets/fashion-mnist .gpu/fashion-mnist
#   there:  run(command="bash .gpu/check.sh", carry=[".gpu"], timeout_s=420)
#
# Writes every result under $OUT (info.txt, bench.json, train.jsonl, nccl.txt).
# The device machine has PyTorch 2.11.0 in its python3; its libraries go on
# LD_LIBRARY_PATH because the binary's rpath points at this machine.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
T=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
nv=$(dirname "$T")/nvidia
LD_LIBRARY_PATH="$T/lib:$(ls -d "$nv"/*/lib 2>/dev/null | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH JEPA_NCCL_LIB="$nv/nccl/lib/libnccl.so.2"
bin="$here/jepa-worker"

echo "== info" | tee "$out/info.txt"
"$bin" info --device cuda 2>&1 | tee -a "$out/info.txt"

echo "== bench: small preset, 224 px, batch 64, bf16 where the trainer uses it"
"$bin" bench --preset small --image-size 224 --patch-size 16 --channels 3 --batch 64 \
  --steps 20 --warmup 5 --device cuda --json 2>"$out/bench.log" | tee "$out/bench.json"

echo "== a short CUDA training run on Fashion-MNIST (images/s in its step lines)"
"$bin" train --device cuda --json --set schedule.steps=300 --set optim.warmup_steps=15 \
  --set "data.path=$here/fashion-mnist" --set schedule.log_every=50 \
  --out "$out/run" >"$out/train.jsonl" 2>"$out/train.log"
grep '"kind":"step"' "$out/train.jsonl" | tail -n 2

echo "== NCCL: a 2-rank run needs two GPUs; with one, only the library and ids are checked"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "gpus: $gpus" | tee "$out/nccl.txt"
if [ "$gpus" -ge 2 ]; then
  "$bin" train --device cuda --set resources.ranks=2 --set resources.gpus=2 --set schedule.steps=50 \
    --set optim.warmup_steps=5 --set "data.path=$here/fashion-mnist" --json --out "$out/dp0" \
    --rank 0 --world 2 >"$out/dp0.jsonl" 2>"$out/dp0.log" &
  sleep 5
  id=$(grep -m1 '"kind":"listening"' "$out/dp0.jsonl" | sed 's/.*"address":"\([^"]*\)".*/\1/')
  CUDA_VISIBLE_DEVICES=1 "$bin" train --device cuda:0 --set resources.ranks=2 --set resources.gpus=2 \
    --set schedule.steps=50 --set optim.warmup_steps=5 --set "data.path=$here/fashion-mnist" --json \
    --out "$out/dp1" --rank 1 --world 2 --master "$id" >/dev/null 2>"$out/dp1.log"
  wait
  grep '"kind":"step"' "$out/dp0.jsonl" | tail -n 1 | tee -a "$out/nccl.txt"
fi
