//! `jepa-coordinator bench`: measures the coordinator on this machine and
//! prints submit throughput and latency, metric ingestion rate and
//! placement time among many simulated workers.
//!
//! Submits and metrics go through a real gRPC server on loopback backed by
//! the configured store (sled in a scratch folder by default), so the
//! figures include encoding, the network stack and the flush before every
//! acknowledgement. Placement is measured twice: the pure scheduler, and a
//! whole in-process submit that places a run among the simulated workers.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use jepa_common::proto::{
    self, user_service_client::UserServiceClient, worker_service_client::WorkerServiceClient,
};
use jepa_common::spec::RunSpec;
use tonic::transport::Channel;

use crate::clock::SystemClock;
use crate::config::{CoordinatorConfig, StoreKind};
use crate::scheduler::{self, Capacity};
use crate::server;

/// What to measure and how much.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Runs to submit in the concurrent phase (a quarter as many go one by
    /// one first).
    #[arg(long, default_value_t = 2000)]
    pub submits: usize,
    /// Concurrent clients of the concurrent phases.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Metric points to ingest.
    #[arg(long, default_value_t = 400_000)]
    pub points: usize,
    /// Points per report.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Simulated workers for the placement measurements.
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// Placements to time.
    #[arg(long, default_value_t = 2000)]
    pub placements: usize,
    /// Use the memory store instead of sled.
    #[arg(long)]
    pub memory: bool,
    /// Folder for the sled store; a scratch folder (removed after) by default.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Latency figures of one phase.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    /// Operations timed.
    pub count: usize,
    /// Operations per second over the phase.
    pub per_sec: f64,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// Every figure the benchmark measures.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Store backend used.
    pub store: String,
    /// Submits from one client, one after another.
    pub submit_serial: Latency,
    /// Submits from concurrent clients.
    pub submit_concurrent: Latency,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Metric points ingested per second.
    pub points_per_sec: f64,
    /// Points ingested.
    pub points: usize,
    /// Metric points ingested per second by direct calls, without gRPC.
    pub points_per_sec_in_process: f64,
    /// Pure scheduler placement among the simulated workers.
    pub placement: Latency,
    /// In-process submit that places among the simulated workers.
    pub submit_with_placement: Latency,
    /// Simulated workers.
    pub workers: usize,
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn latency(mut samples: Vec<Duration>, elapsed: Duration) -> Latency {
    samples.sort_unstable();
    Latency {
        count: samples.len(),
        per_sec: samples.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50: percentile(&samples, 0.50),
        p99: percentile(&samples, 0.99),
    }
}

fn gpu_spec() -> RunSpec {
    let mut spec = RunSpec { name: "bench".into(), ..Default::default() };
    spec.resources.device = "cuda".into();
    spec.resources.gpus = 1;
    spec
}

/// Runs every phase and returns the figures.
///
/// # Errors
///
/// Fails when the server cannot start or a call fails.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let scratch = args.data_dir.is_none() && !args.memory;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        let nanos = scratch_suffix();
        std::env::temp_dir().join(format!("jepa-bench-{}-{nanos}", std::process::id()))
    });
    let config = CoordinatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: data_dir.clone(),
        store: if args.memory { StoreKind::Memory } else { StoreKind::Sled },
        lease_timeout_ms: 3_600_000,
        heartbeat_interval_ms: 60_000,
        ..CoordinatorConfig::default()
    };
    let result = run_phases(args, &config).await;
    if scratch {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

fn scratch_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

async fn run_phases(args: &BenchArgs, config: &CoordinatorConfig) -> anyhow::Result<Report> {
    let running = server::start(config).await?;
    let channel = Channel::from_shared(running.url())?
        .connect()
        .await
        .context("failed to connect to the bench server")?;
    let mut report = Report {
        store: if args.memory {
            "memory".into()
        } else {
            format!("sled at {}", config.data_dir.display())
        },
        concurrency: args.concurrency.max(1),
        workers: args.workers,
        ..Default::default()
    };

    // Warm-up: connections, allocator and store caches.
    submit_phase(&channel, 1, 50).await?;
    report.submit_serial = submit_phase(&channel, 1, (args.submits / 4).max(1)).await?;
    report.submit_concurrent = submit_phase(&channel, report.concurrency, args.submits).await?;
    report.points = args.points;
    report.points_per_sec = metrics_phase(&channel, args, report.concurrency).await?;
    running.stop().await?;
    let in_process =
        CoordinatorConfig { data_dir: config.data_dir.join("in-process"), ..config.clone() };
    report.points_per_sec_in_process =
        metrics_in_process_phase(&in_process, args, report.concurrency).await?;

    report.placement = placement_phase(args);
    report.submit_with_placement = submit_with_placement_phase(args).await?;
    Ok(report)
}

async fn submit_phase(channel: &Channel, clients: usize, total: usize) -> anyhow::Result<Latency> {
    let spec = proto::RunSpec::from(&gpu_spec());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..clients {
        let mut client = UserServiceClient::new(channel.clone());
        let spec = spec.clone();
        let share = total / clients + usize::from(client_index < total % clients);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(share);
            for _ in 0..share {
                let request =
                    proto::SubmitRunRequest { spec: Some(spec.clone()), ..Default::default() };
                let t = Instant::now();
                client.submit_run(request).await?;
                samples.push(t.elapsed());
            }
            anyhow::Ok(samples)
        }));
    }
    let mut samples = Vec::with_capacity(total);
    for task in tasks {
        samples.extend(task.await??);
    }
    Ok(latency(samples, started.elapsed()))
}

async fn metrics_phase(channel: &Channel, args: &BenchArgs, clients: usize) -> anyhow::Result<f64> {
    let mut workers = WorkerServiceClient::new(channel.clone());
    let resources = proto::WorkerResources { cpu_slots: 4, ..Default::default() };
    let registered = workers
        .register(proto::RegisterRequest {
            name: "bench-cpu".into(),
            resources: Some(resources),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut user = UserServiceClient::new(channel.clone());
    let cpu = proto::RunSpec::from(&RunSpec { name: "metrics".into(), ..Default::default() });
    let run = user
        .submit_run(proto::SubmitRunRequest { spec: Some(cpu), ..Default::default() })
        .await?
        .into_inner()
        .run
        .context("empty reply")?;
    anyhow::ensure!(
        run.state == proto::RunState::Scheduled as i32,
        "metrics run was not scheduled: {}",
        run.pending_reason
    );

    let batch = args.batch.max(1);
    let batches = args.points / batch;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..clients {
        let mut client = WorkerServiceClient::new(channel.clone());
        let (worker_id, run_id) = (registered.worker_id.clone(), run.id.clone());
        let share = batches / clients + usize::from(client_index < batches % clients);
        tasks.push(tokio::spawn(async move {
            let series = format!("bench/client{client_index}");
            for b in 0..share {
                let request = metric_batch(&series, b, batch, &worker_id, &run_id);
                client.report_metrics(request).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((batches * batch) as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// The `b`-th report of one bench client: `batch` points of `series` at
/// consecutive steps, so no two reports of a client overlap.
fn metric_batch(
    series: &str,
    b: usize,
    batch: usize,
    worker_id: &str,
    run_id: &str,
) -> proto::ReportMetricsRequest {
    let points = (0..batch)
        .map(|i| proto::MetricPoint {
            series: series.to_string(),
            step: (b * batch + i) as u64,
            value: i as f64,
            wall_time_ms: 0,
        })
        .collect();
    proto::ReportMetricsRequest {
        worker_id: worker_id.to_string(),
        run_id: run_id.to_string(),
        attempt: 1,
        points,
    }
}

async fn metrics_in_process_phase(
    config: &CoordinatorConfig,
    args: &BenchArgs,
    clients: usize,
) -> anyhow::Result<f64> {
    let coord = server::open_coordinator(config, Arc::new(SystemClock))?;
    let resources = proto::WorkerResources { cpu_slots: 1, ..Default::default() };
    let request = proto::RegisterRequest {
        name: "bench-cpu".into(),
        resources: Some(resources),
        ..Default::default()
    };
    let worker_id = coord.register_worker(request).await?.worker_id;
    let spec = proto::RunSpec::from(&RunSpec { name: "metrics".into(), ..Default::default() });
    let run_id = coord.submit_run(Some(spec), 0, String::new()).await?.id;

    let batch = args.batch.max(1);
    let batches = args.points / batch;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client_index in 0..clients {
        let (coord, worker_id, run_id) = (Arc::clone(&coord), worker_id.clone(), run_id.clone());
        let share = batches / clients + usize::from(client_index < batches % clients);
        tasks.push(tokio::spawn(async move {
            let series = format!("bench/client{client_index}");
            for b in 0..share {
                let request = metric_batch(&series, b, batch, &worker_id, &run_id);
                coord.report_metrics(request).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((batches * batch) as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// Simulated free capacity: every worker has 8 GPUs, a varying number of
/// them already taken.
fn simulated_capacities(workers: usize) -> Vec<Capacity> {
    (0..workers)
        .map(|i| {
            let free = (i * 7 + 3) % 9;
            Capacity {
                worker: i as u64 + 1,
                free_gpus: (0..free as u32).map(|g| (g, 80 << 30)).collect(),
                free_cpu_slots: 16,
            }
        })
        .collect()
}

fn placement_phase(args: &BenchArgs) -> Latency {
    let caps = simulated_capacities(args.workers);
    let requests = [
        proto::ResourceRequest {
            gpu: true,
            ranks: 1,
            hosts: 1,
            ranks_per_host: 1,
            min_gpu_memory_bytes: 0,
        },
        proto::ResourceRequest {
            gpu: true,
            ranks: 8,
            hosts: 1,
            ranks_per_host: 8,
            min_gpu_memory_bytes: 0,
        },
        proto::ResourceRequest {
            gpu: true,
            ranks: 16,
            hosts: 4,
            ranks_per_host: 4,
            min_gpu_memory_bytes: 0,
        },
    ];
    let started = Instant::now();
    let samples: Vec<Duration> = (0..args.placements.max(1))
        .map(|i| {
            let t = Instant::now();
            let placed = scheduler::place(&requests[i % requests.len()], &caps);
            let elapsed = t.elapsed();
            std::hint::black_box(placed).ok();
            elapsed
        })
        .collect();
    latency(samples, started.elapsed())
}

async fn submit_with_placement_phase(args: &BenchArgs) -> anyhow::Result<Latency> {
    let config = CoordinatorConfig {
        store: StoreKind::Memory,
        lease_timeout_ms: 3_600_000,
        heartbeat_interval_ms: 60_000,
        ..Default::default()
    };
    let coord = server::open_coordinator(&config, Arc::new(SystemClock))?;
    for i in 0..args.workers {
        let gpus = (0..8)
            .map(|g| proto::GpuDevice { index: g, name: "sim".into(), memory_bytes: 80 << 30 })
            .collect();
        let resources = proto::WorkerResources { gpus, cpu_slots: 16, memory_bytes: 0 };
        let request = proto::RegisterRequest {
            name: format!("sim-{i}"),
            resources: Some(resources),
            ..Default::default()
        };
        coord.register_worker(request).await?;
    }
    let spec = proto::RunSpec::from(&gpu_spec());
    let count = args.placements.min(args.workers * 8).max(1);
    let started = Instant::now();
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        let run = coord.submit_run(Some(spec.clone()), 0, String::new()).await?;
        samples.push(t.elapsed());
        anyhow::ensure!(
            run.state == proto::RunState::Scheduled as i32,
            "run not placed: {}",
            run.pending_reason
        );
    }
    Ok(latency(samples, started.elapsed()))
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.submit_serial;
        let c = &self.submit_concurrent;
        let p = &self.placement;
        let e = &self.submit_with_placement;
        writeln!(f, "store: {}", self.store)?;
        writeln!(
            f,
            "submit, 1 client:        {:>6} runs  {:>9.0} runs/s  p50 {}  p99 {}",
            s.count,
            s.per_sec,
            ms(s.p50),
            ms(s.p99)
        )?;
        writeln!(
            f,
            "submit, {:>2} clients:      {:>6} runs  {:>9.0} runs/s  p50 {}  p99 {}",
            self.concurrency,
            c.count,
            c.per_sec,
            ms(c.p50),
            ms(c.p99)
        )?;
        writeln!(
            f,
            "metrics ingest (gRPC):   {:>6} points  {:>9.0} points/s",
            self.points, self.points_per_sec
        )?;
        writeln!(
            f,
            "metrics ingest (direct): {:>6} points  {:>9.0} points/s",
            self.points, self.points_per_sec_in_process
        )?;
        writeln!(
            f,
            "placement among {} workers (scheduler): p50 {}  p99 {}",
            self.workers,
            ms(p.p50),
            ms(p.p99)
        )?;
        writeln!(
            f,
            "submit + placement among {} workers (in-process): p50 {}  p99 {}",
            self.workers,
            ms(e.p50),
            ms(e.p99)
        )?;
        let submit_p99 = s.p99.max(c.p99);
        writeln!(
            f,
            "target p99 submit < 5 ms: {} ({})",
            verdict(submit_p99 < Duration::from_millis(5)),
            ms(submit_p99)
        )?;
        writeln!(
            f,
            "target 100000 points/s: {} ({:.0})",
            verdict(self.points_per_sec >= 100_000.0),
            self.points_per_sec
        )?;
        write!(
            f,
            "target placement < 1 ms: {} (p99 {})",
            verdict(p.p99 < Duration::from_millis(1)),
            ms(p.p99)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_sample() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn every_simulated_worker_fits_some_requests() {
        let caps = simulated_capacities(1000);
        let req = proto::ResourceRequest {
            gpu: true,
            ranks: 8,
            hosts: 1,
            ranks_per_host: 8,
            min_gpu_memory_bytes: 0,
        };
        assert!(scheduler::place(&req, &caps).is_ok());
    }
}
