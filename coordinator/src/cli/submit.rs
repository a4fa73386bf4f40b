//! Builds a run spec from `jepactl` arguments: a TOML file (or the
//! defaults), then the named flags, then every `--set FIELD=VALUE`, in that
//! order, so the most specific wins.

use std::path::PathBuf;

use anyhow::Context;
use jepa_common::spec::RunSpec;
use jepa_common::spec_override::set_field;

/// The spec of a run as flags; shared by `submit` and `sweep submit`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SpecArgs {
    /// Run spec file (TOML); without it the defaults make a small CPU run
    /// on Fashion-MNIST.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run name (name).
    #[arg(long)]
    pub name: Option<String>,
    /// Model preset: tiny, small, base, large, huge, giant or custom
    /// (model.preset).
    #[arg(long)]
    pub preset: Option<String>,
    /// Context block scale range (mask.context_scale), e.g. 0.85:1.0.
    #[arg(long, value_name = "LOW:HIGH")]
    pub context_scale: Option<String>,
    /// Target block scale range (mask.target_scale), e.g. 0.15:0.2.
    #[arg(long, value_name = "LOW:HIGH")]
    pub target_scale: Option<String>,
    /// Conditioning: none (I-JEPA) or ec (conditioning.kind).
    #[arg(long)]
    pub conditioning: Option<String>,
    /// Conditioning token: learned or position (conditioning.token).
    #[arg(long)]
    pub cond_token: Option<String>,
    /// Mask sampler: faithful or fixed (mask.mode).
    #[arg(long)]
    pub mask_mode: Option<String>,
    /// Data set: fashion_mnist, mnist, image_folder, synthetic
    /// (data.dataset).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Data set folder on the workers (data.path).
    #[arg(long)]
    pub data_path: Option<String>,
    /// Optimiser steps (schedule.steps).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per step per rank (optim.batch_size).
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Peak learning rate (optim.lr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed (seed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Scheduling priority; higher runs first (priority).
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Restarts allowed after lost or failed attempts (max_restarts).
    #[arg(long)]
    pub max_restarts: Option<u32>,
    /// Device: cpu, cuda or cuda:N (resources.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Data-parallel ranks (resources.ranks); on CUDA one GPU each.
    #[arg(long)]
    pub ranks: Option<u32>,
    /// Hosts the ranks are spread over (resources.hosts).
    #[arg(long)]
    pub hosts: Option<u32>,
    /// Smallest GPU memory a rank needs, in GiB.
    #[arg(long, value_name = "GIB")]
    pub min_gpu_memory: Option<f64>,
    /// Any field by its dotted path (repeatable), e.g.
    /// --set optim.weight_decay=0.04:0.4.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
}

impl SpecArgs {
    /// Returns the spec these arguments describe, validated.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be read, a flag does not parse, or the
    /// result is invalid; the message names the field.
    pub fn build(&self) -> anyhow::Result<RunSpec> {
        let mut spec = match &self.config {
            Some(path) => RunSpec::from_file(path)?,
            None => RunSpec::default(),
        };
        let gpus_set = self.set.iter().any(|s| s.starts_with("resources.gpus="));
        for (path, value) in self.overrides()? {
            spec = set_field(&spec, &path, &value)?;
        }
        if !gpus_set && (self.device.is_some() || self.ranks.is_some()) {
            // One GPU per rank is the only valid choice; spare the user it.
            spec.resources.gpus = if spec.resources.is_cuda() { spec.resources.ranks } else { 0 };
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Smallest GPU memory in bytes; 0 when not given.
    pub fn min_gpu_memory_bytes(&self) -> u64 {
        self.min_gpu_memory.map_or(0, |gib| (gib.max(0.0) * f64::from(1u32 << 30)) as u64)
    }

    /// The named flags and `--set` pairs as (field path, text), in the
    /// order they apply.
    fn overrides(&self) -> anyhow::Result<Vec<(String, String)>> {
        let named: [(&str, Option<String>); 19] = [
            ("name", self.name.clone()),
            ("model.preset", self.preset.clone()),
            ("mask.context_scale", self.context_scale.clone()),
            ("mask.target_scale", self.target_scale.clone()),
            ("conditioning.kind", self.conditioning.clone()),
            ("conditioning.token", self.cond_token.clone()),
            ("mask.mode", self.mask_mode.clone()),
            ("data.dataset", self.dataset.clone()),
            ("data.path", self.data_path.clone()),
            ("schedule.steps", self.steps.map(|v| v.to_string())),
            ("optim.batch_size", self.batch_size.map(|v| v.to_string())),
            ("optim.lr", self.lr.map(|v| v.to_string())),
            ("seed", self.seed.map(|v| v.to_string())),
            ("priority", self.priority.map(|v| v.to_string())),
            ("max_restarts", self.max_restarts.map(|v| v.to_string())),
            ("resources.device", self.device.clone()),
            ("resources.ranks", self.ranks.map(|v| v.to_string())),
            ("resources.hosts", self.hosts.map(|v| v.to_string())),
            ("resources.gpus", None),
        ];
        let mut pairs: Vec<(String, String)> = named
            .into_iter()
            .filter_map(|(path, value)| Some((path.to_string(), value?)))
            .collect();
        for item in &self.set {
            let (path, value) = item
                .split_once('=')
                .with_context(|| format!("--set {item:?}: write FIELD=VALUE"))?;
            pairs.push((path.trim().to_string(), value.to_string()));
        }
        Ok(pairs)
    }
}

/// Parses `FIELD=V1,V2,...` into a sweep axis.
///
/// # Errors
///
/// Fails when the text has no `=` or no value.
pub fn parse_axis(text: &str) -> anyhow::Result<jepa_common::proto::SweepAxis> {
    let (field, values) =
        text.split_once('=').with_context(|| format!("--axis {text:?}: write FIELD=V1,V2,..."))?;
    let values: Vec<String> =
        values.split(',').map(str::trim).filter(|v| !v.is_empty()).map(String::from).collect();
    anyhow::ensure!(!values.is_empty(), "--axis {text:?} has no value");
    Ok(jepa_common::proto::SweepAxis { field: field.trim().to_string(), values })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jepa_common::spec::{Conditioning, RunSpec};

    #[test]
    fn no_arguments_make_the_default_run() {
        assert_eq!(SpecArgs::default().build().unwrap(), RunSpec::default());
    }

    #[test]
    fn flags_apply_over_the_file_and_set_wins_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "name = \"from-file\"\n[schedule]\nsteps = 770\n").unwrap();
        let args = SpecArgs {
            config: Some(path),
            context_scale: Some("0.65:1.0".into()),
            conditioning: Some("none".into()),
            set: vec!["schedule.steps=900".into()],
            ..Default::default()
        };
        let spec = args.build().unwrap();
        assert_eq!(spec.name, "from-file");
        assert_eq!(spec.mask.context_scale, [0.65, 1.0]);
        assert_eq!(spec.conditioning.kind, Conditioning::None);
        assert_eq!(spec.schedule.steps, 900);
    }

    #[test]
    fn cuda_ranks_get_one_gpu_each() {
        let args = SpecArgs { device: Some("cuda".into()), ranks: Some(4), ..Default::default() };
        let spec = args.build().unwrap();
        assert_eq!((spec.resources.gpus, spec.resources.ranks), (4, 4));
    }

    #[test]
    fn bad_flags_name_the_field() {
        let args = SpecArgs { context_scale: Some("0.9:0.2".into()), ..Default::default() };
        let err = args.build().unwrap_err();
        assert!(err.to_string().starts_with("mask.context_scale"), "{err}");
    }

    #[test]
    fn axes_parse() {
        let axis = parse_axis("mask.context_scale=0.4:1.0, 0.85:1.0").unwrap();
        assert_eq!(axis.values, vec!["0.4:1.0", "0.85:1.0"]);
        assert!(parse_axis("nothing").is_err());
    }
}
