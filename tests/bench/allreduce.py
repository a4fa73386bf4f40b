"""All-reduce bandwidth of the CPU ring backend against torch.distributed
with gloo, on loopback, side by side in one run.

    python tests/bench/allreduce.py --bin target/release/jepa-worker [--world 2]
        [--sizes-mb 1,16,256] [--iters 5]

Both sides sum float32 buffers of the same sizes across the same number of
processes on this machine, with one warm-up all-reduce and the same number
of timed ones; the time is rank 0's mean per all-reduce. algbw is the
buffer size divided by that time; the ratio is ring bandwidth over gloo's.
"""

import argparse
import json
import os
import socket
import subprocess
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_rank(rank, world, sizes, iters, warmup, port, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mb in sizes:
        n = mb * (1 << 20) // 4
        t = torch.ones(n)
        dist.all_reduce(t)
        assert torch.all(t == world), "gloo all-reduce of ones"
        for _ in range(warmup - 1):
            t.fill_(1.0)
            dist.all_reduce(t)
        dist.barrier()
        total = 0.0
        for _ in range(iters):
            t.fill_(1.0 / world)
            start = time.perf_counter()
            dist.all_reduce(t)
            total += time.perf_counter() - start
        if rank == 0:
            queue.put((mb, total / iters))
    dist.destroy_process_group()


def gloo(world, sizes, iters, warmup):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=gloo_rank, args=(r, world, sizes, iters, warmup, port, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=600) for _ in sizes)
    for p in procs:
        p.join()
        assert p.exitcode == 0, "a gloo rank failed"
    return results


def ring(binary, world, sizes, iters, warmup):
    out = subprocess.run(
        [binary, "bench-allreduce", "--world", str(world), "--sizes-mb", ",".join(map(str, sizes)),
         "--iters", str(iters), "--warmup", str(warmup)],
        check=True, capture_output=True, text=True).stdout
    results = {}
    for line in out.splitlines():
        event = json.loads(line)
        if event.get("kind") == "allreduce":
            results[event["mb"]] = event["seconds"]
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default="target/release/jepa-worker")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--sizes-mb", default="1,16,256")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    ours = ring(args.bin, args.world, sizes, args.iters, args.warmup)
    theirs = gloo(args.world, sizes, args.iters, args.warmup)
    print(f"all-reduce, {args.world} processes on loopback, float32 sum, "
          f"{args.iters} timed runs per size (torch {torch.__version__})")
    print("| size | ring ms | ring GB/s | gloo ms | gloo GB/s | ring/gloo |")
    print("|---|---|---|---|---|---|")
    for mb in sizes:
        a, b = ours[mb], theirs[mb]
        gb = mb * (1 << 20) / 1e9
        print(f"| {mb} MiB | {a * 1e3:.1f} | {gb / a:.2f} | {b * 1e3:.1f} | {gb / b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
