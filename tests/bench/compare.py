"""Runs `jepa-worker bench` and its PyTorch eager counterpart on the same
workload and prints both figures side by side with their ratio.

For each case the Rust bench writes the workload (sizes, masks, initial
weights, images); bench_torch.py replays it. The two sides run in
alternating order for --rounds rounds, so load from other processes falls
on both; step times are pooled over the rounds. Throughput is images over
the summed step time; the median and the fastest step are the figures
least moved by outside load on a shared machine. Every ratio is Rust speed
over PyTorch speed: above 1, Rust is faster.

The first losses of both sides must agree (same weights, images, masks),
or the workloads differ and the script exits 1.

Usage: compare.py [--bin PATH] [--rounds N] [--steps N] [--warmup N]
                  [--threads N] [--case "BENCH ARGS"]... [--workdir DIR]
With no --case it runs the CPU cases of `make bench`.
"""

import argparse
import json
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent

# Small CPU configurations: the default run spec's Fashion-MNIST-sized
# custom model without and with EC conditioning, and the tiny preset at
# I-JEPA's 224 px, patch 16, on a small batch.
DEFAULT_CASES = [
    "--preset custom --image-size 28 --patch-size 4 --channels 1 --batch 64 --conditioning none",
    "--preset custom --image-size 28 --patch-size 4 --channels 1 --batch 64 --conditioning ec",
    "--preset tiny --image-size 224 --patch-size 16 --channels 3 --batch 8 --conditioning none",
]

# First-step losses must agree this closely (relative): f32 on CPU, bf16
# matrix products on CUDA.
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}


def run_json(command):
    """Runs a command and returns the JSON object on the last line of its
    standard output."""
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"compare: {shlex.join(command)} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(args, case, workload):
    rust_cmd = [args.bin, "bench", *shlex.split(case), "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--json", "--workload-out", str(workload)]
    if args.threads:
        rust_cmd += ["--threads", str(args.threads)]
    torch_cmd = [sys.executable, str(HERE / "bench_torch.py"), str(workload), "--json"]
    rust, torch = [], []
    rust.append(run_json(rust_cmd))  # writes the workload the PyTorch side reads
    torch.append(run_json(torch_cmd))
    for r in range(1, args.rounds):
        # Alternate which side goes first, so neither always follows the other.
        if r % 2:
            torch.append(run_json(torch_cmd))
            rust.append(run_json(rust_cmd))
        else:
            rust.append(run_json(rust_cmd))
            torch.append(run_json(torch_cmd))
    return rust, torch


def pooled(reports):
    times = [t for r in reports for t in r["step_times_ms"]]
    images = sum(r["batch"] * len(r["step_times_ms"]) for r in reports)
    return {
        "images_per_s": images / (sum(times) / 1e3),
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "first_loss": reports[0]["first_loss"],
    }


def label(report):
    r = report
    return (f"{r['preset']} {r['image_size']}px/p{r['patch_size']} c{r['channels']} "
            f"D{r['embed_dim']}x{r['depth']} b{r['batch']} {r['conditioning']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/release/jepa-worker")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="CPU threads of both sides "
                        "(default: libtorch's default in the Rust process)")
    parser.add_argument("--case", action="append", help="arguments of jepa-worker bench")
    parser.add_argument("--workdir", type=pathlib.Path, help="where workloads go (default: temp)")
    args = parser.parse_args()
    cases = args.case or DEFAULT_CASES

    rows, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or pathlib.Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for i, case in enumerate(cases):
            rust, torch = run_case(args, case, workdir / f"case{i}.json")
            r, t = pooled(rust), pooled(torch)
            precision = rust[0]["precision"]
            gap = abs(r["first_loss"] - t["first_loss"]) / max(abs(t["first_loss"]), 1e-12)
            agrees = gap <= LOSS_TOLERANCE[precision]
            failed |= not agrees
            rows.append((label(rust[0]), rust[0], torch[0], r, t, gap, agrees))

    first = rows[0][1]
    print(f"device {first['device']}, {first['precision']}, {first['threads']} CPU threads each; "
          f"torch {rows[0][2]['torch']}; {args.rounds} rounds x {args.steps} timed steps "
          f"(after {args.warmup} warm-up) per side")
    header = ("case", "Rust img/s", "PyTorch img/s", "ratio", "median ms Rust / PyTorch",
              "ratio (median)", "min ms Rust / PyTorch", "ratio (min)", "first loss gap")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, _, _, r, t, gap, agrees in rows:
        cells = (
            name,
            f"{r['images_per_s']:.1f}",
            f"{t['images_per_s']:.1f}",
            f"{r['images_per_s'] / t['images_per_s']:.2f}",
            f"{r['median_ms']:.0f} / {t['median_ms']:.0f}",
            f"{t['median_ms'] / r['median_ms']:.2f}",
            f"{r['min_ms']:.0f} / {t['min_ms']:.0f}",
            f"{t['min_ms'] / r['min_ms']:.2f}",
            f"{gap:.1e}" + ("" if agrees else " MISMATCH"),
        )
        print("| " + " | ".join(cells) + " |")
    for name, rust, torch, r, t, _, _ in rows:
        # Same masks on both sides, so the same model FLOPs per step.
        flops = rust["flops_per_step"]
        rate = {side: flops * p["images_per_s"] / rust["batch"] for side, p in (("r", r), ("t", t))}
        line = (f"{name}: {flops / 1e9:.2f} GFLOP/step; Rust {rate['r'] / 1e9:.1f} GFLOP/s, "
                f"PyTorch {rate['t'] / 1e9:.1f} GFLOP/s")
        if rust["peak_tflops"]:
            peak = rust["peak_tflops"] * 1e12
            mfu = {side: 100 * value / peak for side, value in rate.items()}
            line += f"; MFU Rust {mfu['r']:.2f} %, PyTorch {mfu['t']:.2f} %"
        if rust["peak_memory_mib"] is not None:
            line += f"; peak memory Rust {rust['peak_memory_mib']:.0f} MiB (device, reserved)"
        if torch["peak_memory_reserved_mib"] is not None:
            line += (f", PyTorch {torch['peak_memory_reserved_mib']:.0f} MiB reserved / "
                     f"{torch['peak_memory_allocated_mib']:.0f} MiB allocated")
        print(line)
    if failed:
        sys.exit("compare: first-step losses differ; the two sides did not run the same workload")


if __name__ == "__main__":
    main()
