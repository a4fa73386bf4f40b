//! `jepa-worker bench-allreduce`: times the CPU ring's all-reduce between
//! rank processes on this machine. Without `--rank` it is the launcher: it
//! starts one process per rank (rank 0 first, the others pointed at its
//! address), forwards rank 0's result lines, and fails if any rank fails.
//! `tests/bench/allreduce.py` runs it beside `torch.distributed` with gloo.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::tcp::{RingConfig, RingListener, TcpRing};

/// Options of the all-reduce benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct AllreduceBenchArgs {
    /// Ranks (processes on this machine).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Buffer sizes in MiB, comma-separated.
    #[arg(long, default_value = "1,16,256")]
    pub sizes_mb: String,
    /// Timed all-reduces per size.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Untimed all-reduces per size before timing.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Internal: this process's rank (set by the launcher).
    #[arg(long, hide = true)]
    pub rank: Option<usize>,
    /// Internal: rank 0's address (set by the launcher).
    #[arg(long, hide = true)]
    pub master: Option<SocketAddr>,
}

fn sizes(text: &str) -> anyhow::Result<Vec<usize>> {
    text.split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&mb| mb > 0 && mb <= 4096)
                .with_context(|| format!("--sizes-mb: {s:?} is not a size from 1 to 4096 MiB"))
        })
        .collect()
}

/// Runs the benchmark (launcher or one rank).
///
/// # Errors
///
/// Bad options, a rank that fails, or a wrong all-reduce result.
pub fn run(args: &AllreduceBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!((2..=64).contains(&args.world), "--world must be 2 to 64, got {}", args.world);
    let sizes = sizes(&args.sizes_mb)?;
    match args.rank {
        Some(rank) => run_rank(args, rank, &sizes),
        None => launch(args),
    }
}

fn launch(args: &AllreduceBenchArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let common = |rank: usize| {
        let mut command = Command::new(&exe);
        command
            .arg("bench-allreduce")
            .args(["--world", &args.world.to_string(), "--sizes-mb", &args.sizes_mb])
            .args(["--iters", &args.iters.to_string(), "--warmup", &args.warmup.to_string()])
            .args(["--rank", &rank.to_string()])
            .stdin(Stdio::null());
        command
    };
    let mut zero = common(0).stdout(Stdio::piped()).spawn().context("cannot start rank 0")?;
    let mut lines = BufReader::new(zero.stdout.take().context("rank 0 stdout")?).lines();
    let first = lines.next().context("rank 0 ended before listening")??;
    let master: serde_json::Value = serde_json::from_str(&first)?;
    let master =
        master["address"].as_str().context("rank 0 did not print its address")?.to_string();
    let mut others = Vec::new();
    for rank in 1..args.world {
        let child = common(rank).args(["--master", &master]).stdout(Stdio::null()).spawn()?;
        others.push(child);
    }
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{}", line?)?;
    }
    anyhow::ensure!(zero.wait()?.success(), "rank 0 failed");
    for (i, mut child) in others.into_iter().enumerate() {
        anyhow::ensure!(child.wait()?.success(), "rank {} failed", i + 1);
    }
    Ok(())
}

fn run_rank(args: &AllreduceBenchArgs, rank: usize, sizes: &[usize]) -> anyhow::Result<()> {
    let listener = RingListener::bind("127.0.0.1:0")?;
    if rank == 0 {
        println!(
            "{}",
            serde_json::json!({ "kind": "listening", "address": listener.local_addr()?.to_string() })
        );
    }
    let config = RingConfig {
        rank,
        world: args.world,
        token: "bench".into(),
        timeout: Duration::from_secs(120),
    };
    let mut ring = TcpRing::connect(&config, listener, args.master)?;
    for &mb in sizes {
        let n = mb * (1 << 20) / 4;
        let mut data = vec![1.0f32; n];
        ring.all_reduce_sum(&mut data)?;
        // Every element of a sum of ones is the number of ranks.
        let expected = args.world as f32;
        anyhow::ensure!(
            data.iter().all(|&v| v == expected),
            "all-reduce of ones gave a value other than {expected}"
        );
        for _ in 1..args.warmup {
            data.fill(1.0);
            ring.all_reduce_sum(&mut data)?;
        }
        let mut token = [0.0f32];
        ring.all_reduce_sum(&mut token)?;
        let mut total = Duration::ZERO;
        for _ in 0..args.iters {
            data.fill(1.0 / args.world as f32);
            let start = Instant::now();
            ring.all_reduce_sum(&mut data)?;
            total += start.elapsed();
        }
        let seconds = total.as_secs_f64() / args.iters.max(1) as f64;
        if rank == 0 {
            let bytes = (n * 4) as f64;
            println!(
                "{}",
                serde_json::json!({
                    "kind": "allreduce",
                    "backend": "tcp-ring",
                    "world": args.world,
                    "mb": mb,
                    "seconds": seconds,
                    "algbw_gbps": bytes / seconds / 1e9,
                })
            );
        }
    }
    Ok(())
}
