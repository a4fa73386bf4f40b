//! Sweeps beyond submission: their state derived from the trials, the
//! limit on trials running at once, cancellation, and the report that
//! summarises a metric over seeds from the stored metrics.

use std::collections::HashMap;

use jepa_common::proto::{self, RunState, SweepState};
use jepa_common::series;
use jepa_common::spec::RunSpec;

use super::runs::AttemptEnd;
use super::{is_terminal, lock, Coordinator, State};
use crate::error::{CoordError, CoordResult};
use crate::store::records;

/// The axis whose values are pooled in a report.
pub const SEED_AXIS: &str = "seed";

/// The axis that is the report's x axis.
pub const SCALE_AXIS: &str = "mask.context_scale";

/// Counts the trials per state and derives the sweep's state.
pub fn sweep_state(runs: &[proto::Run]) -> (SweepState, proto::SweepCounts) {
    let mut counts = proto::SweepCounts::default();
    for run in runs {
        match RunState::try_from(run.state) {
            Ok(RunState::Pending) | Ok(RunState::Unspecified) | Err(_) => counts.pending += 1,
            Ok(RunState::Scheduled) => counts.scheduled += 1,
            Ok(RunState::Running) => counts.running += 1,
            Ok(RunState::Succeeded) => counts.succeeded += 1,
            Ok(RunState::Failed) => counts.failed += 1,
            Ok(RunState::Cancelled) => counts.cancelled += 1,
        }
    }
    let finished = counts.succeeded + counts.failed + counts.cancelled;
    let state = if finished as usize == runs.len() {
        if counts.cancelled > 0 {
            SweepState::Cancelled
        } else if counts.failed > 0 {
            SweepState::Failed
        } else {
            SweepState::Succeeded
        }
    } else if counts.pending as usize == runs.len() {
        SweepState::Pending
    } else {
        SweepState::Running
    };
    (state, counts)
}

/// Lower-case name of a sweep state, as `jepactl` prints it.
pub fn sweep_state_name(state: SweepState) -> &'static str {
    match state {
        SweepState::Unspecified => "unspecified",
        SweepState::Pending => "pending",
        SweepState::Running => "running",
        SweepState::Succeeded => "succeeded",
        SweepState::Failed => "failed",
        SweepState::Cancelled => "cancelled",
    }
}

impl State {
    /// Whether a pending run must wait because its sweep already has its
    /// limit of trials scheduled or running; returns the sweep and limit.
    pub(crate) fn sweep_limit_reached(&self, run: &proto::Run) -> Option<(String, u32)> {
        if run.sweep_id.is_empty() {
            return None;
        }
        let sweep = self.sweeps.get(&records::parse_id("swp", &run.sweep_id)?)?;
        if sweep.max_parallel == 0 {
            return None;
        }
        let active = sweep
            .run_ids
            .iter()
            .filter_map(|id| records::parse_id("run", id))
            .filter_map(|seq| self.runs.get(&seq))
            .filter(|e| {
                e.run.state == RunState::Scheduled as i32 || e.run.state == RunState::Running as i32
            })
            .count();
        (active >= sweep.max_parallel as usize).then(|| (sweep.id.clone(), sweep.max_parallel))
    }
}

/// The pending reason of a run held back by its sweep's limit.
pub fn sweep_limit_reason(sweep_id: &str, limit: u32) -> String {
    format!("sweep {sweep_id} already runs its limit of {limit} trials at once")
}

impl Coordinator {
    /// Cancels every unfinished trial of a sweep in one transaction;
    /// returns how many were cancelled and the sweep's state after.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown sweep; a store error.
    pub async fn cancel_sweep(
        &self,
        sweep_id: &str,
        reason: &str,
    ) -> CoordResult<(u32, SweepState)> {
        let seq = records::parse_id("swp", sweep_id)
            .ok_or_else(|| CoordError::not_found("sweep", sweep_id))?;
        let message = if reason.is_empty() {
            format!("sweep {sweep_id} cancelled by user")
        } else {
            format!("sweep {sweep_id} cancelled by user: {reason}")
        };
        let cancelled = self
            .transact(|tx| {
                let sweep = tx
                    .st
                    .sweeps
                    .get(&seq)
                    .ok_or_else(|| CoordError::not_found("sweep", sweep_id))?;
                let runs: Vec<u64> =
                    sweep.run_ids.iter().filter_map(|id| records::parse_id("run", id)).collect();
                let mut cancelled = 0;
                for rseq in runs {
                    let Some(entry) = tx.st.runs.get(&rseq) else { continue };
                    let state = entry.run.state;
                    if is_terminal(state) {
                        continue;
                    }
                    if state == RunState::Pending as i32 {
                        let key = (std::cmp::Reverse(entry.run.priority), rseq);
                        tx.st.pending.remove(&key);
                        tx.set_run_state(rseq, RunState::Cancelled, &message);
                    } else {
                        tx.end_attempt(rseq, AttemptEnd::Cancelled(message.clone()));
                    }
                    cancelled += 1;
                }
                Ok(cancelled)
            })
            .await?;
        let (_, runs) = self.get_sweep(sweep_id)?;
        tracing::info!(%sweep_id, cancelled, "sweep cancelled");
        Ok((cancelled, sweep_state(&runs).0))
    }

    /// Builds the report of a sweep from the final value of `metric` of
    /// each trial, as stored.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown sweep; INVALID_ARGUMENT for a bad series
    /// name; a store error.
    pub fn sweep_report(
        &self,
        sweep_id: &str,
        metric: &str,
    ) -> CoordResult<proto::GetSweepReportResponse> {
        let metric = if metric.is_empty() { series::PROBE_TOP1 } else { metric };
        series::check_name(metric).map_err(|m| CoordError::invalid("metric", m))?;
        let (sweep, runs) = self.get_sweep(sweep_id)?;
        let mut finals = HashMap::new();
        for run in &runs {
            let Some(seq) = records::parse_id("run", &run.id) else { continue };
            let top = lock(&self.state).runs.get(&seq).and_then(|e| e.series.get(metric).copied());
            if let Some(top) = top {
                let request = proto::GetMetricsRequest {
                    run_id: run.id.clone(),
                    series: vec![metric.to_string()],
                    step_from: top,
                    step_to: Some(top),
                    limit: 1,
                };
                let value = self
                    .get_metrics(&request)?
                    .into_iter()
                    .flat_map(|s| s.points)
                    .next_back()
                    .map(|p| p.value);
                if let Some(value) = value {
                    finals.insert(run.id.clone(), value);
                }
            }
        }
        let state = sweep_state(&runs).0;
        let rows = build_report(&sweep, &runs, &finals);
        Ok(proto::GetSweepReportResponse {
            sweep: Some(sweep),
            metric: metric.to_string(),
            rows,
            state: state as i32,
        })
    }
}

/// Groups the trials by every axis value but the seed, in sweep order, and
/// summarises each group's final values: mean, sample standard deviation,
/// range, and the drop from the best mean of its line (the rows that
/// differ only in context scale). Trials without a value are listed as
/// missing, never dropped silently.
pub fn build_report(
    sweep: &proto::Sweep,
    runs: &[proto::Run],
    finals: &HashMap<String, f64>,
) -> Vec<proto::SweepReportRow> {
    let axes: Vec<&proto::SweepAxis> = sweep.axes.iter().collect();
    let mut rows: Vec<proto::SweepReportRow> = Vec::new();
    let mut index_of: HashMap<Vec<String>, usize> = HashMap::new();
    for (i, run) in runs.iter().enumerate() {
        let point = axis_point(&axes, i);
        let grouped: Vec<proto::AxisValue> =
            point.iter().filter(|v| v.field != SEED_AXIS).cloned().collect();
        let key: Vec<String> = grouped.iter().map(|v| format!("{}={}", v.field, v.value)).collect();
        let row = *index_of.entry(key).or_insert_with(|| {
            let scale = grouped.iter().find(|v| v.field == SCALE_AXIS).map(|v| v.value.clone());
            let line = grouped
                .iter()
                .filter(|v| v.field != SCALE_AXIS)
                .map(|v| format!("{}={}", v.field, v.value))
                .collect::<Vec<_>>()
                .join(", ");
            rows.push(proto::SweepReportRow {
                point: grouped.clone(),
                context_scale: scale.unwrap_or_default(),
                line,
                ..Default::default()
            });
            rows.len() - 1
        });
        let seed = run.spec.clone().and_then(|s| RunSpec::try_from(s).ok()).map_or(0, |s| s.seed);
        let value = finals.get(&run.id).copied();
        let entry = &mut rows[row];
        entry.trials += 1;
        entry.values.push(proto::SweepTrialValue {
            run_id: run.id.clone(),
            seed,
            value,
            state: run.state,
        });
        if value.is_none() {
            let state = super::state_name(run.state);
            entry.missing.push(format!("{} ({state})", run.id));
        }
    }
    for row in &mut rows {
        let values: Vec<f64> = row.values.iter().filter_map(|v| v.value).collect();
        row.reported = u32::try_from(values.len()).unwrap_or(u32::MAX);
        if values.is_empty() {
            continue;
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        row.mean = Some(mean);
        if values.len() >= 2 {
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
            row.std = Some(var.sqrt());
        }
        row.min = values.iter().copied().reduce(f64::min);
        row.max = values.iter().copied().reduce(f64::max);
    }
    let mut best: HashMap<String, f64> = HashMap::new();
    for row in &rows {
        if let Some(mean) = row.mean {
            let slot = best.entry(row.line.clone()).or_insert(f64::NEG_INFINITY);
            *slot = slot.max(mean);
        }
    }
    for row in &mut rows {
        if let (Some(mean), Some(top)) = (row.mean, best.get(&row.line)) {
            row.drop_from_best = Some(top - mean);
        }
    }
    rows
}

/// The axis values of trial `index` (the cartesian product's order: the
/// last axis varies fastest).
pub fn axis_point(axes: &[&proto::SweepAxis], index: usize) -> Vec<proto::AxisValue> {
    let mut rest = index;
    let mut point = Vec::with_capacity(axes.len());
    for axis in axes.iter().rev() {
        let n = axis.values.len().max(1);
        let value = axis.values.get(rest % n).cloned().unwrap_or_default();
        rest /= n;
        point.push(proto::AxisValue { field: axis.field.clone(), value });
    }
    point.reverse();
    point
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(field: &str, values: &[&str]) -> proto::SweepAxis {
        proto::SweepAxis {
            field: field.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn run(id: &str, seed: u64, state: RunState) -> proto::Run {
        let spec = RunSpec { seed, ..Default::default() };
        proto::Run {
            id: id.into(),
            state: state as i32,
            spec: Some((&spec).into()),
            ..Default::default()
        }
    }

    #[test]
    fn states_derive_from_the_trials() {
        let r = |s| run("run-000001", 0, s);
        assert_eq!(
            sweep_state(&[r(RunState::Pending), r(RunState::Pending)]).0,
            SweepState::Pending
        );
        assert_eq!(
            sweep_state(&[r(RunState::Succeeded), r(RunState::Pending)]).0,
            SweepState::Running
        );
        assert_eq!(
            sweep_state(&[r(RunState::Succeeded), r(RunState::Succeeded)]).0,
            SweepState::Succeeded
        );
        assert_eq!(
            sweep_state(&[r(RunState::Succeeded), r(RunState::Failed)]).0,
            SweepState::Failed
        );
        let (state, counts) =
            sweep_state(&[r(RunState::Failed), r(RunState::Cancelled), r(RunState::Running)]);
        assert_eq!(state, SweepState::Running);
        assert_eq!((counts.failed, counts.cancelled, counts.running), (1, 1, 1));
    }

    #[test]
    fn the_report_pools_seeds_and_measures_drops_per_line() {
        let sweep = proto::Sweep {
            axes: vec![
                axis("mask.context_scale", &["0.4:1.0", "0.85:1.0"]),
                axis("conditioning.kind", &["none", "ec"]),
                axis("seed", &["0", "1"]),
            ],
            ..Default::default()
        };
        // Order: scale-major, then conditioning, then seed.
        let runs: Vec<proto::Run> = (0..8)
            .map(|i| {
                let state = if i == 5 { RunState::Failed } else { RunState::Succeeded };
                run(&format!("run-{i:06}"), i % 2, state)
            })
            .collect();
        let values = [0.60, 0.64, 0.70, 0.72, 0.80, f64::NAN, 0.75, 0.77];
        let finals: HashMap<String, f64> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .map(|(i, v)| (format!("run-{i:06}"), *v))
            .collect();
        let rows = build_report(&sweep, &runs, &finals);
        assert_eq!(rows.len(), 4);
        let none_low = &rows[0];
        assert_eq!(none_low.context_scale, "0.4:1.0");
        assert_eq!(none_low.line, "conditioning.kind=none");
        assert_eq!((none_low.trials, none_low.reported), (2, 2));
        assert!((none_low.mean.unwrap() - 0.62).abs() < 1e-12);
        assert!((none_low.std.unwrap() - 0.0008f64.sqrt()).abs() < 1e-12);
        // I-JEPA is best at 0.85 (0.80 alone, its second seed failed).
        let none_high = &rows[2];
        assert_eq!(none_high.reported, 1);
        assert_eq!(none_high.missing, vec!["run-000005 (failed)".to_string()]);
        assert_eq!(none_high.std, None);
        assert!((none_high.drop_from_best.unwrap()).abs() < 1e-12);
        assert!((none_low.drop_from_best.unwrap() - 0.18).abs() < 1e-12);
        // EC-IJEPA: 0.71 at 0.4 and 0.76 at 0.85.
        let ec_low = &rows[1];
        assert!((ec_low.drop_from_best.unwrap() - 0.05).abs() < 1e-12);
        assert_eq!(ec_low.values.iter().map(|v| v.seed).collect::<Vec<_>>(), vec![0, 1]);
    }
}
