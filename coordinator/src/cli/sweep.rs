//! `jepactl sweep`: submit a context-scale sweep from flags, follow its
//! trials, print and save its robustness report, cancel it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use jepa_common::proto::{self, SweepState};
use jepa_common::spec::RunSpec;
use serde_json::json;

use super::output::{print_runs, progress_text, table};
use super::submit::{parse_axis, SpecArgs};
use super::{connect, plot};
use crate::core::state_name;
use crate::core::sweeps::{axis_point, sweep_state_name, SCALE_AXIS, SEED_AXIS};

/// `jepactl sweep`: flags submit a sweep; a subcommand acts on one.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SweepCommand {
    /// What to do with an existing sweep.
    #[command(subcommand)]
    pub action: Option<SweepAction>,
    /// The sweep to submit when no subcommand is given.
    #[command(flatten)]
    pub submit: SweepArgs,
}

/// A sweep as flags: a base spec and its axes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SweepArgs {
    /// Name of the sweep; its trials are named `<name>-<index>`.
    #[arg(long, default_value = "sweep")]
    pub name: String,
    /// Context-scale ranges to compare (mask.context_scale), e.g.
    /// 0.40:1.0,0.65:1.0,0.75:1.0,0.85:1.0.
    #[arg(long, value_name = "LOW:HIGH,...")]
    pub context_scale: Option<String>,
    /// Conditionings to compare: none (I-JEPA), ec (EC-IJEPA).
    #[arg(long, value_name = "KIND,...")]
    pub conditioning: Option<String>,
    /// Seeds of each point, e.g. 0,1; the report pools them.
    #[arg(long, value_name = "SEED,...")]
    pub seeds: Option<String>,
    /// Any other axis by field path, `FIELD=V1,V2,...` (repeatable), e.g.
    /// model.depth=4,6.
    #[arg(long = "axis", value_name = "FIELD=V1,V2")]
    pub axes: Vec<String>,
    /// Most trials scheduled or running at once; 0 means no limit.
    #[arg(long, default_value_t = 0)]
    pub max_parallel: u32,
    /// Base run spec (TOML); the defaults without it.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A base-spec field by path (repeatable, or comma-separated pairs),
    /// e.g. --set schedule.steps=600,model.depth=2.
    #[arg(long = "set", value_name = "FIELD=VALUE,...")]
    pub set: Vec<String>,
    /// Smallest GPU memory a rank needs, in GiB.
    #[arg(long, value_name = "GIB")]
    pub min_gpu_memory: Option<f64>,
}

/// Subcommands of `jepactl sweep`.
#[derive(Debug, clap::Subcommand)]
pub enum SweepAction {
    /// Shows a sweep's state and a table of its trials.
    #[command(alias = "get")]
    Status {
        /// Sweep id, e.g. swp-000001.
        sweep_id: String,
    },
    /// Prints the robustness report (metric per context scale and
    /// conditioning over seeds) and writes it as CSV, JSON and an SVG plot.
    Report {
        /// Sweep id.
        sweep_id: String,
        /// Series whose final value is reported.
        #[arg(long, default_value = jepa_common::series::PROBE_TOP1)]
        metric: String,
        /// Folder for `<sweep>-report.csv`, `.json` and `.svg`.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        /// Print only; write no files.
        #[arg(long)]
        no_files: bool,
    },
    /// Cancels every unfinished trial; finished ones keep their results.
    Cancel {
        /// Sweep id.
        sweep_id: String,
        /// Why, for each trial's history.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Runs `jepactl sweep ...`.
///
/// # Errors
///
/// Bad flags (naming the axis and the value) or a failed call.
pub async fn run(address: &str, command: SweepCommand, json: bool) -> anyhow::Result<()> {
    match command.action {
        None => submit(address, &command.submit, json).await,
        Some(SweepAction::Status { sweep_id }) => status(address, sweep_id, json).await,
        Some(SweepAction::Report { sweep_id, metric, out_dir, no_files }) => {
            report(address, sweep_id, metric, (!no_files).then_some(out_dir.as_path()), json).await
        }
        Some(SweepAction::Cancel { sweep_id, reason }) => {
            let reply = connect(address)
                .await?
                .cancel_sweep(proto::CancelSweepRequest { sweep_id: sweep_id.clone(), reason })
                .await?
                .into_inner();
            let state = sweep_state_name(reply.state());
            if json {
                println!(
                    "{}",
                    json!({ "id": sweep_id, "cancelled": reply.cancelled, "state": state })
                );
            } else {
                println!("{sweep_id}: {} trial(s) cancelled; sweep {state}", reply.cancelled);
            }
            Ok(())
        }
    }
}

impl SweepArgs {
    /// The base spec's part of these flags, as `jepactl submit` reads it.
    fn spec_args(&self) -> SpecArgs {
        SpecArgs {
            config: self.config.clone(),
            set: self.set.iter().flat_map(|s| split_pairs(s)).collect(),
            min_gpu_memory: self.min_gpu_memory,
            ..Default::default()
        }
    }

    /// The base spec and the axes, in report order: context scale,
    /// conditioning, the generic axes, then seeds (varying fastest).
    ///
    /// # Errors
    ///
    /// A message naming the flag and the bad value.
    pub fn build(&self) -> anyhow::Result<(RunSpec, Vec<proto::SweepAxis>)> {
        let base = self.spec_args().build()?;
        let mut axes = Vec::new();
        if let Some(text) = &self.context_scale {
            let values = list("--context-scale", text)?;
            for value in &values {
                check_scale(value)?;
            }
            axes.push(proto::SweepAxis { field: SCALE_AXIS.into(), values });
        }
        if let Some(text) = &self.conditioning {
            let values = list("--conditioning", text)?;
            if let Some(bad) = values.iter().find(|v| !matches!(v.as_str(), "none" | "ec")) {
                anyhow::bail!("--conditioning: {bad:?} is not a conditioning; allowed: none, ec");
            }
            axes.push(proto::SweepAxis { field: "conditioning.kind".into(), values });
        }
        for text in &self.axes {
            axes.push(parse_axis(text)?);
        }
        if let Some(text) = &self.seeds {
            let values = list("--seeds", text)?;
            if let Some(bad) = values.iter().find(|v| v.parse::<u64>().is_err()) {
                anyhow::bail!("--seeds: {bad:?} is not a seed; allowed: whole numbers 0 and up");
            }
            axes.push(proto::SweepAxis { field: SEED_AXIS.into(), values });
        }
        for (i, axis) in axes.iter().enumerate() {
            if axes[..i].iter().any(|a| a.field == axis.field) {
                anyhow::bail!("the axis {} is given twice; list its values once", axis.field);
            }
        }
        anyhow::ensure!(
            !axes.is_empty(),
            "a sweep needs an axis: --context-scale, --conditioning, --seeds or --axis FIELD=V1,V2"
        );
        Ok((base, axes))
    }
}

/// Splits `a.b=1,c=2` into `a.b=1` and `c=2`; a comma not followed by
/// `FIELD=` stays inside the value.
fn split_pairs(text: &str) -> Vec<String> {
    let mut pairs: Vec<String> = Vec::new();
    for piece in text.split(',') {
        let starts_pair = piece.split_once('=').is_some_and(|(field, _)| {
            !field.is_empty()
                && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        });
        match pairs.last_mut() {
            Some(last) if !starts_pair => {
                last.push(',');
                last.push_str(piece);
            }
            _ => pairs.push(piece.to_string()),
        }
    }
    pairs
}

fn list(flag: &str, text: &str) -> anyhow::Result<Vec<String>> {
    let values: Vec<String> =
        text.split(',').map(str::trim).filter(|v| !v.is_empty()).map(String::from).collect();
    anyhow::ensure!(!values.is_empty(), "{flag} {text:?} has no value");
    Ok(values)
}

/// Checks `LOW:HIGH` with 0 < LOW <= HIGH <= 1.
fn check_scale(value: &str) -> anyhow::Result<()> {
    let bad = || {
        anyhow::anyhow!(
            "--context-scale: {value:?} is not a range LOW:HIGH with 0 < LOW <= HIGH <= 1"
        )
    };
    let (low, high) = value.split_once(':').ok_or_else(bad)?;
    let (low, high): (f64, f64) =
        (low.trim().parse().map_err(|_| bad())?, high.trim().parse().map_err(|_| bad())?);
    if !(low > 0.0 && low <= high && high <= 1.0) {
        return Err(bad());
    }
    Ok(())
}

async fn submit(address: &str, args: &SweepArgs, json: bool) -> anyhow::Result<()> {
    let (base, axes) = args.build()?;
    let min_gpu_memory_bytes = args.spec_args().min_gpu_memory_bytes();
    let request = proto::SubmitSweepRequest {
        name: args.name.clone(),
        base: Some(proto::RunSpec::from(&base)),
        axes,
        min_gpu_memory_bytes,
        max_parallel: args.max_parallel,
    };
    let sweep = connect(address)
        .await?
        .submit_sweep(request)
        .await?
        .into_inner()
        .sweep
        .context("empty reply")?;
    if json {
        println!("{}", json!({ "id": sweep.id, "name": sweep.name, "run_ids": sweep.run_ids }));
    } else {
        let limit = if sweep.max_parallel == 0 {
            String::new()
        } else {
            format!(", at most {} at once", sweep.max_parallel)
        };
        println!("submitted {} ({} trials{limit})", sweep.id, sweep.run_ids.len());
        println!("  status: jepactl sweep status {}", sweep.id);
        println!("  report: jepactl sweep report {}", sweep.id);
    }
    Ok(())
}

/// `field=value` pairs of one trial, short field names.
fn point_text(point: &[proto::AxisValue]) -> String {
    point
        .iter()
        .map(|v| format!("{}={}", v.field.rsplit('.').next().unwrap_or(&v.field), v.value))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn status(address: &str, sweep_id: String, json: bool) -> anyhow::Result<()> {
    let mut client = connect(address).await?;
    let reply = client.get_sweep(proto::GetSweepRequest { sweep_id }).await?.into_inner();
    let sweep = reply.sweep.clone().context("empty reply")?;
    let state = sweep_state_name(reply.state());
    if json {
        print_runs(&reply.runs, "", true);
        return Ok(());
    }
    let counts = reply.counts.unwrap_or_default();
    println!(
        "{} {}: {state} ({} trials: {} pending, {} scheduled, {} running, {} succeeded, {} failed, {} cancelled)",
        sweep.id,
        sweep.name,
        reply.runs.len(),
        counts.pending,
        counts.scheduled,
        counts.running,
        counts.succeeded,
        counts.failed,
        counts.cancelled
    );
    let axes: Vec<&proto::SweepAxis> = sweep.axes.iter().collect();
    let rows: Vec<Vec<String>> = reply
        .runs
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let point = axis_point(&axes, i);
            let progress = progress_text(run);
            let note = if run.pending_reason.is_empty() {
                run.message.clone()
            } else {
                run.pending_reason.clone()
            };
            vec![
                run.id.clone(),
                point_text(&point),
                state_name(run.state).to_string(),
                progress,
                note.lines().next().unwrap_or("").chars().take(60).collect(),
            ]
        })
        .collect();
    println!("{}", table(&["RUN", "POINT", "STATE", "PROGRESS", "NOTE"], &rows));
    Ok(())
}

/// The report's rows as printed and as CSV: one per point without seed.
fn report_rows(report: &proto::GetSweepReportResponse, percent: bool) -> Vec<Vec<String>> {
    let scale = if percent { 100.0 } else { 1.0 };
    let num = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.2}", v * scale));
    report
        .rows
        .iter()
        .map(|row| {
            vec![
                if row.context_scale.is_empty() { "-".into() } else { row.context_scale.clone() },
                if row.line.is_empty() { "-".into() } else { row.line.clone() },
                format!("{}/{}", row.reported, row.trials),
                num(row.mean),
                num(row.std),
                num(row.min),
                num(row.max),
                num(row.drop_from_best),
                if row.missing.is_empty() { "-".into() } else { row.missing.join(" ") },
            ]
        })
        .collect()
}

const REPORT_HEADERS: [&str; 9] =
    ["CONTEXT SCALE", "LINE", "N", "MEAN", "STD", "MIN", "MAX", "DROP FROM BEST", "MISSING"];

/// The report as JSON (values as stored, in [0, 1] for top-1).
pub fn report_json(report: &proto::GetSweepReportResponse) -> serde_json::Value {
    let sweep = report.sweep.clone().unwrap_or_default();
    json!({
        "sweep_id": sweep.id,
        "name": sweep.name,
        "metric": report.metric,
        "state": sweep_state_name(report.state()),
        "rows": report.rows.iter().map(|row| json!({
            "context_scale": row.context_scale,
            "line": row.line,
            "point": row.point.iter().map(|v| json!({ "field": v.field, "value": v.value })).collect::<Vec<_>>(),
            "trials": row.trials,
            "reported": row.reported,
            "mean": row.mean,
            "std": row.std,
            "min": row.min,
            "max": row.max,
            "drop_from_best": row.drop_from_best,
            "missing": row.missing,
            "values": row.values.iter().map(|v| json!({
                "run_id": v.run_id, "seed": v.seed, "value": v.value, "state": state_name(v.state),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// The report as CSV, one row per point, values as stored.
pub fn report_csv(report: &proto::GetSweepReportResponse) -> String {
    let mut out =
        String::from("context_scale,line,trials,reported,mean,std,min,max,drop_from_best,missing");
    let num = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    for row in &report.rows {
        out.push_str(&format!(
            "\n{},\"{}\",{},{},{},{},{},{},{},\"{}\"",
            row.context_scale,
            row.line.replace('"', "\"\""),
            row.trials,
            row.reported,
            num(row.mean),
            num(row.std),
            num(row.min),
            num(row.max),
            num(row.drop_from_best),
            row.missing.join(" ")
        ));
    }
    out.push('\n');
    out
}

async fn report(
    address: &str,
    sweep_id: String,
    metric: String,
    out_dir: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let request = proto::GetSweepReportRequest { sweep_id: sweep_id.clone(), metric };
    let report = connect(address).await?.get_sweep_report(request).await?.into_inner();
    let percent = report.metric.ends_with("top1");
    if json {
        println!("{}", report_json(&report));
    } else {
        let state = report.state();
        let unit = if percent { " (%)" } else { "" };
        println!("{sweep_id}: {} by context scale and line, over seeds{unit}", report.metric);
        println!("{}", table(&REPORT_HEADERS, &report_rows(&report, percent)));
        if state != SweepState::Succeeded {
            println!(
                "sweep {}: trials without a value are listed as missing",
                sweep_state_name(state)
            );
        }
    }
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let stem = dir.join(format!("{sweep_id}-report"));
        let files = [
            (stem.with_extension("csv"), report_csv(&report)),
            (stem.with_extension("json"), format!("{:#}\n", report_json(&report))),
            (stem.with_extension("svg"), plot::report_svg(&report)),
        ];
        for (path, text) in &files {
            std::fs::write(path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        if !json {
            let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
            println!("wrote {}", names.join(", "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> SweepCommand {
        let mut argv = vec!["jepactl", "sweep"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Sweep(command) => *command,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn flags_make_the_axes_in_report_order() {
        let command = parse(&[
            "--seeds",
            "0,1",
            "--conditioning",
            "none,ec",
            "--context-scale",
            "0.4:1.0,0.85:1.0",
            "--axis",
            "model.depth=2,4",
            "--set",
            "schedule.steps=50,optim.warmup_steps=5",
        ]);
        assert!(command.action.is_none());
        let (base, axes) = command.submit.build().unwrap();
        let fields: Vec<&str> = axes.iter().map(|a| a.field.as_str()).collect();
        assert_eq!(fields, ["mask.context_scale", "conditioning.kind", "model.depth", "seed"]);
        assert_eq!(axes[0].values, ["0.4:1.0", "0.85:1.0"]);
        assert_eq!((base.schedule.steps, base.optim.warmup_steps), (50, 5));
    }

    #[test]
    fn bad_axis_values_name_the_flag_and_the_value() {
        let err = parse(&["--context-scale", "0.4:1.0,1.2:1.0"]).submit.build().unwrap_err();
        assert!(err.to_string().contains("--context-scale: \"1.2:1.0\""), "{err}");
        let err = parse(&["--conditioning", "ec,jepa"]).submit.build().unwrap_err();
        assert!(err.to_string().contains("\"jepa\" is not a conditioning"), "{err}");
        let err = parse(&["--seeds", "0,x"]).submit.build().unwrap_err();
        assert!(err.to_string().contains("--seeds: \"x\""), "{err}");
        let err = parse(&["--set", "schedule.steps=0"]).submit.build().unwrap_err();
        assert!(err.to_string().contains("schedule.steps"), "{err}");
        let err = parse(&[]).submit.build().unwrap_err();
        assert!(err.to_string().contains("needs an axis"), "{err}");
    }

    #[test]
    fn subcommands_take_a_sweep_id() {
        let command = parse(&["report", "swp-000003", "--no-files"]);
        assert!(matches!(
            command.action,
            Some(SweepAction::Report { ref sweep_id, no_files: true, .. }) if sweep_id == "swp-000003"
        ));
        assert!(matches!(parse(&["get", "swp-1"]).action, Some(SweepAction::Status { .. })));
    }

    #[test]
    fn set_pairs_split_only_before_a_field() {
        assert_eq!(split_pairs("a.b=1,c=2"), ["a.b=1", "c=2"]);
        assert_eq!(split_pairs("data.path=/x,y"), ["data.path=/x,y"]);
    }
}
