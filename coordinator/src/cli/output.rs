//! How `jepactl` prints: aligned tables for people, JSON for programs, CSV
//! for metric points. JSON names states and enums in words, not numbers.

use std::time::{SystemTime, UNIX_EPOCH};

use jepa_common::proto;
use jepa_common::spec::RunSpec;
use serde_json::{json, Value};

use crate::core::state_name;

/// Formats rows as columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = vec![line(headers.to_vec())];
    out.extend(rows.iter().map(|r| line(r.iter().map(String::as_str).collect())));
    out.join("\n")
}

/// Formats a past Unix-millisecond time as an age, e.g. "3m ago".
pub fn age(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let secs = (now - ms).max(0) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

fn request_text(req: Option<&proto::ResourceRequest>) -> String {
    let Some(r) = req else { return "-".into() };
    let unit = if r.gpu { "gpu" } else { "cpu" };
    if r.hosts > 1 {
        format!("{}x{unit} on {} hosts", r.ranks, r.hosts)
    } else {
        format!("{}x{unit}", r.ranks)
    }
}

/// A run's progress as `step/total loss L`, or `-`.
pub fn progress_text(run: &proto::Run) -> String {
    let Some(p) = &run.progress else { return "-".into() };
    let loss = p.loss.map_or(String::new(), |l| format!(" loss {l:.4}"));
    format!("{}/{}{loss}", p.step, p.total_steps)
}

/// A run as JSON.
pub fn run_json(run: &proto::Run) -> Value {
    let spec = run.spec.clone().and_then(|s| RunSpec::try_from(s).ok());
    json!({
        "id": run.id,
        "name": run.name,
        "state": state_name(run.state),
        "pending_reason": run.pending_reason,
        "message": run.message,
        "priority": run.priority,
        "created_ms": run.created_ms,
        "started_ms": run.started_ms,
        "finished_ms": run.finished_ms,
        "restarts": run.restarts,
        "sweep_id": run.sweep_id,
        "last_checkpoint_step": run.last_checkpoint_step,
        "progress": run.progress.as_ref().map(|p| json!({
            "step": p.step, "total_steps": p.total_steps, "loss": p.loss,
            "images_per_sec": p.images_per_sec,
        })),
        "request": run.request.as_ref().map(|r| json!({
            "gpu": r.gpu, "ranks": r.ranks, "hosts": r.hosts,
            "min_gpu_memory_bytes": r.min_gpu_memory_bytes,
        })),
        "attempts": run.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
        "spec": spec,
    })
}

fn attempt_json(a: &proto::Attempt) -> Value {
    json!({
        "number": a.number,
        "started_ms": a.started_ms,
        "ended_ms": a.ended_ms,
        "end_reason": a.end_reason,
        "resume_step": a.resume_step,
        "placements": a.placements.iter().map(|p| json!({
            "worker_id": p.worker_id, "ranks": p.ranks, "gpu_indices": p.gpu_indices,
            "cpu_slots": p.cpu_slots, "state": state_name(p.state),
        })).collect::<Vec<_>>(),
    })
}

/// Prints a list of runs.
pub fn print_runs(runs: &[proto::Run], next_page_token: &str, as_json: bool) {
    if as_json {
        let runs: Vec<Value> = runs.iter().map(run_json).collect();
        println!("{}", json!({ "runs": runs, "next_page_token": next_page_token }));
        return;
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let note = if r.pending_reason.is_empty() {
                r.message.clone()
            } else {
                r.pending_reason.clone()
            };
            vec![
                r.id.clone(),
                r.name.clone(),
                state_name(r.state).to_string(),
                r.priority.to_string(),
                request_text(r.request.as_ref()),
                progress_text(r),
                age(r.created_ms),
                note,
            ]
        })
        .collect();
    println!(
        "{}",
        table(&["ID", "NAME", "STATE", "PRIO", "NEEDS", "PROGRESS", "CREATED", "NOTE"], &rows)
    );
    if !next_page_token.is_empty() {
        println!("more: --page-token {next_page_token}");
    }
}

/// Prints one run with its attempts and history.
pub fn print_run(run: &proto::Run, events: &[proto::RunEvent], as_json: bool) {
    if as_json {
        let events: Vec<Value> = events
            .iter()
            .map(|e| {
                json!({
                    "seq": e.seq, "time_ms": e.time_ms, "from": state_name(e.from),
                    "to": state_name(e.to), "attempt": e.attempt, "message": e.message,
                })
            })
            .collect();
        println!("{}", json!({ "run": run_json(run), "events": events }));
        return;
    }
    println!("id:        {}", run.id);
    println!("name:      {}", run.name);
    println!("state:     {}", state_name(run.state));
    if !run.pending_reason.is_empty() {
        println!("pending:   {}", run.pending_reason);
    }
    if !run.message.is_empty() {
        println!("message:   {}", run.message);
    }
    println!("priority:  {}", run.priority);
    println!("needs:     {}", request_text(run.request.as_ref()));
    println!("progress:  {}", progress_text(run));
    println!("restarts:  {}", run.restarts);
    if let Some(step) = run.last_checkpoint_step {
        println!("checkpoint: step {step}");
    }
    if !run.attempts.is_empty() {
        println!("\nattempts:");
        let rows: Vec<Vec<String>> = run
            .attempts
            .iter()
            .map(|a| {
                let placed: Vec<String> = a
                    .placements
                    .iter()
                    .map(|p| format!("{} ranks {:?}", p.worker_id, p.ranks))
                    .collect();
                vec![
                    a.number.to_string(),
                    placed.join("; "),
                    a.resume_step.map_or("-".into(), |s| s.to_string()),
                    if a.ended_ms == 0 { "current".into() } else { a.end_reason.clone() },
                ]
            })
            .collect();
        println!("{}", table(&["#", "PLACEMENT", "RESUMED", "END"], &rows));
    }
    if !events.is_empty() {
        println!("\nhistory:");
        let rows: Vec<Vec<String>> = events
            .iter()
            .map(|e| vec![age(e.time_ms), state_name(e.to).to_string(), e.message.clone()])
            .collect();
        println!("{}", table(&["WHEN", "STATE", "WHY"], &rows));
    }
}

/// Prints the workers.
pub fn print_workers(workers: &[proto::Worker], as_json: bool) {
    if as_json {
        let list: Vec<Value> = workers
            .iter()
            .map(|w| {
                let res = w.resources.clone().unwrap_or_default();
                json!({
                    "id": w.id, "name": w.name,
                    "state": if w.state == proto::WorkerState::Live as i32 { "live" } else { "lost" },
                    "gpus": res.gpus.iter().map(|g| json!({
                        "index": g.index, "name": g.name, "memory_bytes": g.memory_bytes,
                    })).collect::<Vec<_>>(),
                    "cpu_slots": res.cpu_slots,
                    "last_heartbeat_ms": w.last_heartbeat_ms,
                    "lease_expires_ms": w.lease_expires_ms,
                    "allocations": w.allocations.iter().map(|a| json!({
                        "run_id": a.run_id, "attempt": a.attempt, "gpu_indices": a.gpu_indices,
                        "cpu_slots": a.cpu_slots, "draining": a.draining,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", json!({ "workers": list }));
        return;
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let res = w.resources.clone().unwrap_or_default();
            let used_gpus: usize = w.allocations.iter().map(|a| a.gpu_indices.len()).sum();
            let used_slots: u32 = w.allocations.iter().map(|a| a.cpu_slots).sum();
            let runs: Vec<String> = w.allocations.iter().map(|a| a.run_id.clone()).collect();
            vec![
                w.id.clone(),
                w.name.clone(),
                if w.state == proto::WorkerState::Live as i32 {
                    "live".into()
                } else {
                    "lost".into()
                },
                format!("{used_gpus}/{}", res.gpus.len()),
                format!("{used_slots}/{}", res.cpu_slots),
                age(w.last_heartbeat_ms),
                runs.join(","),
            ]
        })
        .collect();
    println!("{}", table(&["ID", "NAME", "STATE", "GPUS", "CPU", "HEARTBEAT", "RUNS"], &rows));
}

/// Prints committed checkpoints.
pub fn print_checkpoints(list: &[proto::CheckpointInfo], as_json: bool) {
    if as_json {
        let list: Vec<Value> = list
            .iter()
            .map(|c| {
                json!({
                    "run_id": c.run_id, "step": c.step, "attempt": c.attempt,
                    "size_bytes": c.size_bytes, "sha256": c.sha256, "committed_ms": c.committed_ms,
                    "spec_hash": c.spec_hash,
                })
            })
            .collect();
        println!("{}", json!({ "checkpoints": list }));
        return;
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                c.step.to_string(),
                c.attempt.to_string(),
                c.size_bytes.to_string(),
                c.sha256.chars().take(16).collect(),
                age(c.committed_ms),
            ]
        })
        .collect();
    println!("{}", table(&["STEP", "ATTEMPT", "BYTES", "SHA256", "COMMITTED"], &rows));
}

/// Renders metric series as a table, CSV or JSON.
pub fn render_metrics(series: &[proto::MetricSeries], format: super::MetricsFormat) -> String {
    use super::MetricsFormat as F;
    match format {
        F::Json => {
            let list: Vec<Value> = series
                .iter()
                .map(|s| json!({
                    "series": s.series,
                    "points": s.points.iter().map(|p| json!({
                        "step": p.step, "value": finite_or_text(p.value), "wall_time_ms": p.wall_time_ms,
                    })).collect::<Vec<_>>(),
                }))
                .collect();
            json!({ "series": list }).to_string()
        }
        F::Csv => {
            let mut out = String::from("series,step,value,wall_time_ms");
            for s in series {
                for p in &s.points {
                    out.push_str(&format!(
                        "\n{},{},{},{}",
                        csv_cell(&s.series),
                        p.step,
                        p.value,
                        p.wall_time_ms
                    ));
                }
            }
            out
        }
        F::Table => {
            let rows: Vec<Vec<String>> = series
                .iter()
                .flat_map(|s| {
                    s.points.iter().map(|p| {
                        vec![s.series.clone(), p.step.to_string(), format!("{:.6}", p.value)]
                    })
                })
                .collect();
            table(&["SERIES", "STEP", "VALUE"], &rows)
        }
    }
}

/// JSON has no NaN or infinity; those become strings.
fn finite_or_text(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        json!(value.to_string())
    }
}

fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::MetricsFormat;

    fn series() -> Vec<proto::MetricSeries> {
        let point = |step, value| proto::MetricPoint {
            series: String::new(),
            step,
            value,
            wall_time_ms: 5,
        };
        vec![proto::MetricSeries {
            series: "train/loss".into(),
            points: vec![point(1, 0.5), point(2, f64::NAN)],
        }]
    }

    #[test]
    fn tables_align_columns() {
        let text = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(text, "A     BB\nlong  x");
    }

    #[test]
    fn metrics_render_as_csv_and_json() {
        let csv = render_metrics(&series(), MetricsFormat::Csv);
        assert_eq!(csv, "series,step,value,wall_time_ms\ntrain/loss,1,0.5,5\ntrain/loss,2,NaN,5");
        let json: Value =
            serde_json::from_str(&render_metrics(&series(), MetricsFormat::Json)).unwrap();
        assert_eq!(json["series"][0]["points"][1]["value"], "NaN");
    }

    #[test]
    fn run_json_names_the_state() {
        let run = proto::Run { id: "run-000001".into(), state: 3, ..Default::default() };
        assert_eq!(run_json(&run)["state"], "running");
    }
}
