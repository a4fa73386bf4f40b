//! Metric points: ingestion in batches, idempotent by (run, series, step),
//! and queries by series and step range. Ingestion also moves a run's
//! progress (step, loss, throughput) that watchers and `jepactl` show.

use std::collections::BTreeMap;

use jepa_common::{proto, series};

use super::{parse_run_id, Coordinator};
use crate::error::{CoordError, CoordResult};
use crate::store::prefix_end;
use crate::store::records::{self, StoredPoint, METRIC_BLOCK_STEPS};

/// Most points one report may carry.
pub const MAX_POINTS_PER_REPORT: usize = 10_000;

/// Points per series a query returns when it sets no limit.
const DEFAULT_QUERY_LIMIT: u32 = 10_000;

/// Most points per series one query may ask for.
const MAX_QUERY_LIMIT: u32 = 100_000;

/// Counts of one report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Points not stored before.
    pub accepted: u32,
    /// Points whose (series, step) was already stored.
    pub duplicates: u32,
}

impl Coordinator {
    /// Stores a batch of points for one run.
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT for too many points or a bad series name, NOT_FOUND
    /// for an unknown run, FAILED_PRECONDITION for an attempt that does not
    /// exist; a store error.
    pub async fn report_metrics(&self, req: proto::ReportMetricsRequest) -> CoordResult<Ingested> {
        if req.points.len() > MAX_POINTS_PER_REPORT {
            return Err(CoordError::invalid(
                "points",
                format!(
                    "holds {} points; allowed: at most {MAX_POINTS_PER_REPORT}",
                    req.points.len()
                ),
            ));
        }
        for (i, point) in req.points.iter().enumerate() {
            series::check_name(&point.series)
                .map_err(|message| CoordError::invalid(format!("points[{i}].series"), message))?;
        }
        let rseq = parse_run_id(&req.run_id)?;
        let store = self.store();

        self.transact(|tx| {
            let entry = tx
                .st
                .runs
                .get_mut(&rseq)
                .ok_or_else(|| CoordError::not_found("run", &req.run_id))?;
            let attempts = entry.run.attempts.len();
            if req.attempt == 0 || req.attempt as usize > attempts {
                return Err(CoordError::precondition(format!(
                    "run {} has no attempt {} (it has {attempts})",
                    req.run_id, req.attempt
                )));
            }

            let mut counts = Ingested::default();
            let mut groups: BTreeMap<(&str, u64), Vec<&proto::MetricPoint>> = BTreeMap::new();
            for point in &req.points {
                let block = point.step / METRIC_BLOCK_STEPS;
                groups.entry((point.series.as_str(), block)).or_default().push(point);
            }
            for ((name, block), points) in groups {
                let key = records::metric_block_key(rseq, name, block * METRIC_BLOCK_STEPS);
                let stored_top = entry.series.get(name).copied();
                // A block that starts above the highest stored step of its
                // series holds nothing yet; only older blocks are read.
                let stored = match stored_top {
                    Some(top) if block * METRIC_BLOCK_STEPS <= top => match store.get(&key)? {
                        Some(value) => records::decode_block(&key, &value)?,
                        None => Vec::new(),
                    },
                    _ => Vec::new(),
                };
                let mut merged: BTreeMap<u64, (f64, i64)> =
                    stored.into_iter().map(|(step, v, t)| (step, (v, t))).collect();
                let mut top = 0;
                for p in points {
                    match merged.insert(p.step, (p.value, p.wall_time_ms)) {
                        Some(_) => counts.duplicates += 1,
                        None => counts.accepted += 1,
                    }
                    top = top.max(p.step);
                }
                let block_points: Vec<StoredPoint> =
                    merged.into_iter().map(|(step, (v, t))| (step, v, t)).collect();
                tx.fx.batch.put(key, records::encode_block(&block_points));
                if stored_top.is_none_or(|stored| top > stored) {
                    entry.series.insert(name.to_string(), top);
                    tx.fx.batch.put(records::series_key(rseq, name), records::encode_u64(top));
                }
            }
            update_progress(entry.run.progress.get_or_insert_with(Default::default), &req.points);
            tx.fx.batch.put(records::run_key(rseq), records::encode(&entry.run));
            if tx.fx.watched {
                tx.fx.changed_runs.insert(rseq);
                let batch =
                    proto::MetricBatch { run_id: req.run_id.clone(), points: req.points.clone() };
                tx.fx.metric_batches.push((rseq, batch));
            }
            tracing::debug!(run_id = %req.run_id, accepted = counts.accepted, duplicates = counts.duplicates, "metrics stored");
            Ok(counts)
        })
        .await
    }

    /// Returns points by series and step range.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown run, INVALID_ARGUMENT for a bad range or
    /// limit; a store error.
    pub fn get_metrics(
        &self,
        req: &proto::GetMetricsRequest,
    ) -> CoordResult<Vec<proto::MetricSeries>> {
        let rseq = parse_run_id(&req.run_id)?;
        let limit = match req.limit {
            0 => DEFAULT_QUERY_LIMIT,
            n if n <= MAX_QUERY_LIMIT => n,
            n => {
                return Err(CoordError::invalid(
                    "limit",
                    format!("is {n}; allowed: 0 to {MAX_QUERY_LIMIT}"),
                ))
            }
        };
        if req.step_to.is_some_and(|to| to < req.step_from) {
            return Err(CoordError::invalid("step_to", "is below step_from"));
        }
        let known = self
            .with_state(|st| {
                st.runs.get(&rseq).map(|e| e.series.keys().cloned().collect::<Vec<_>>())
            })
            .ok_or_else(|| CoordError::not_found("run", &req.run_id))?;
        let names: Vec<String> =
            if req.series.is_empty() { known.into_iter().collect() } else { req.series.clone() };

        names
            .into_iter()
            .map(|name| {
                let points =
                    self.read_series(rseq, &name, req.step_from, req.step_to, limit as usize)?;
                Ok(proto::MetricSeries { series: name, points })
            })
            .collect()
    }

    /// Reads up to `limit` points of one series in `[from, to]`, a few
    /// blocks at a time so a short query on a long series reads little.
    fn read_series(
        &self,
        run: u64,
        name: &str,
        from: u64,
        to: Option<u64>,
        limit: usize,
    ) -> CoordResult<Vec<proto::MetricPoint>> {
        const BLOCKS_PER_READ: usize = 16;
        let to = to.unwrap_or(u64::MAX);
        let mut start = records::metric_block_key(run, name, from);
        let end = prefix_end(&records::metric_series_prefix(run, name));
        let mut points = Vec::new();
        loop {
            let blocks = self.store().scan(&start, &end, BLOCKS_PER_READ)?;
            for (key, value) in &blocks {
                for (step, value, wall_time_ms) in records::decode_block(key, value)? {
                    if step > to || points.len() == limit {
                        return Ok(points);
                    }
                    if step >= from {
                        points.push(proto::MetricPoint {
                            series: String::new(),
                            step,
                            value,
                            wall_time_ms,
                        });
                    }
                }
            }
            match blocks.last() {
                Some((last, _)) if blocks.len() == BLOCKS_PER_READ => {
                    start = last.clone();
                    start.push(0);
                }
                _ => return Ok(points),
            }
        }
    }
}

/// Moves progress forward; replayed older points never move it back.
fn update_progress(progress: &mut proto::Progress, points: &[proto::MetricPoint]) {
    let before = progress.step;
    let latest = |name: &str| {
        points.iter().filter(|p| p.series == name && p.step >= before).max_by_key(|p| p.step)
    };
    if let Some(p) = latest(series::LOSS) {
        progress.loss = Some(p.value);
    }
    if let Some(p) = latest(series::IMAGES_PER_SEC) {
        progress.images_per_sec = Some(p.value);
    }
    if let Some(max) = points.iter().map(|p| p.step).max() {
        progress.step = progress.step.max(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(series: &str, step: u64, value: f64) -> proto::MetricPoint {
        proto::MetricPoint { series: series.into(), step, value, wall_time_ms: 0 }
    }

    #[test]
    fn progress_follows_the_newest_points_only() {
        let mut progress = proto::Progress::default();
        update_progress(
            &mut progress,
            &[point(series::LOSS, 10, 0.9), point(series::LOSS, 20, 0.8)],
        );
        assert_eq!((progress.step, progress.loss), (20, Some(0.8)));
        update_progress(&mut progress, &[point(series::LOSS, 10, 5.0)]);
        assert_eq!((progress.step, progress.loss), (20, Some(0.8)));
        update_progress(&mut progress, &[point(series::IMAGES_PER_SEC, 30, 1000.0)]);
        assert_eq!((progress.step, progress.images_per_sec), (30, Some(1000.0)));
    }
}
