//! Conversions between the run spec ([`crate::spec::RunSpec`]) and its wire
//! form (`jepa.v1.RunSpec`), used by `jepactl` to send a spec and by the
//! coordinator and the worker to read one.
//!
//! The wire form has no defaults: a missing section or range and an
//! unspecified enum value are errors naming the field, so a client that
//! forgets a section learns it instead of training with silent defaults.

use crate::proto;
use crate::spec::{
    CondToken, Conditioning, ConditioningSpec, DataSpec, DatasetKind, EvalSpec, MaskMode, MaskSpec,
    ModelSpec, OptimSpec, ResourceSpec, RunSpec, ScheduleSpec, SpecError,
};

fn invalid(field: &str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid { field: field.to_string(), message: message.into() }
}

fn missing(field: &str) -> SpecError {
    invalid(field, "is missing")
}

fn range_to_proto(range: [f64; 2]) -> Option<proto::Range> {
    Some(proto::Range { low: range[0], high: range[1] })
}

fn range_from_proto(field: &str, range: Option<proto::Range>) -> Result<[f64; 2], SpecError> {
    let range = range.ok_or_else(|| missing(field))?;
    Ok([range.low, range.high])
}

impl From<&RunSpec> for proto::RunSpec {
    fn from(spec: &RunSpec) -> Self {
        let m = &spec.model;
        let k = &spec.mask;
        let c = &spec.conditioning;
        let o = &spec.optim;
        let d = &spec.data;
        let s = &spec.schedule;
        let e = &spec.eval;
        let r = &spec.resources;
        proto::RunSpec {
            version: spec.version,
            name: spec.name.clone(),
            seed: spec.seed,
            priority: spec.priority,
            max_restarts: spec.max_restarts,
            model: Some(proto::ModelSpec {
                preset: m.preset.clone(),
                image_size: m.image_size,
                patch_size: m.patch_size,
                in_channels: m.in_channels,
                embed_dim: m.embed_dim,
                depth: m.depth,
                num_heads: m.num_heads,
                pred_depth: m.pred_depth,
                pred_dim: m.pred_dim,
            }),
            mask: Some(proto::MaskSpec {
                mode: mask_mode_to_proto(k.mode) as i32,
                num_targets: k.num_targets,
                target_scale: range_to_proto(k.target_scale),
                target_aspect: range_to_proto(k.target_aspect),
                context_scale: range_to_proto(k.context_scale),
                context_aspect: range_to_proto(k.context_aspect),
                min_keep: k.min_keep,
            }),
            conditioning: Some(proto::ConditioningSpec {
                kind: conditioning_to_proto(c.kind) as i32,
                token: cond_token_to_proto(c.token) as i32,
                kernel: c.kernel,
                stride: c.stride,
            }),
            optim: Some(proto::OptimSpec {
                batch_size: o.batch_size,
                lr: o.lr,
                start_lr: o.start_lr,
                final_lr: o.final_lr,
                warmup_steps: o.warmup_steps,
                weight_decay: range_to_proto(o.weight_decay),
                ema: range_to_proto(o.ema),
                grad_clip: o.grad_clip,
            }),
            data: Some(proto::DataSpec {
                dataset: dataset_to_proto(d.dataset) as i32,
                path: d.path.clone(),
                num_workers: d.num_workers,
                prefetch: d.prefetch,
                crop_scale: range_to_proto(d.crop_scale),
            }),
            schedule: Some(proto::ScheduleSpec {
                steps: s.steps,
                log_every: s.log_every,
                checkpoint_every: s.checkpoint_every,
                eval_every: s.eval_every,
                rankme_every: s.rankme_every,
            }),
            eval: Some(proto::EvalSpec {
                enabled: e.enabled,
                probe_epochs: e.probe_epochs,
                probe_lr: e.probe_lr,
                pooled_kernel: e.pooled_kernel,
                pooled_stride: e.pooled_stride,
                max_train: e.max_train,
                max_test: e.max_test,
            }),
            resources: Some(proto::ResourceSpec {
                device: r.device.clone(),
                gpus: r.gpus,
                ranks: r.ranks,
                hosts: r.hosts,
            }),
        }
    }
}

impl From<RunSpec> for proto::RunSpec {
    fn from(spec: RunSpec) -> Self {
        proto::RunSpec::from(&spec)
    }
}

impl TryFrom<proto::RunSpec> for RunSpec {
    type Error = SpecError;

    /// Converts the wire form and validates the result with
    /// [`RunSpec::validate`].
    fn try_from(wire: proto::RunSpec) -> Result<Self, SpecError> {
        let spec = RunSpec {
            version: wire.version,
            name: wire.name,
            seed: wire.seed,
            priority: wire.priority,
            max_restarts: wire.max_restarts,
            model: model_from_proto(wire.model.ok_or_else(|| missing("model"))?),
            mask: mask_from_proto(wire.mask.ok_or_else(|| missing("mask"))?)?,
            conditioning: conditioning_from_proto(
                wire.conditioning.ok_or_else(|| missing("conditioning"))?,
            )?,
            optim: optim_from_proto(wire.optim.ok_or_else(|| missing("optim"))?)?,
            data: data_from_proto(wire.data.ok_or_else(|| missing("data"))?)?,
            schedule: schedule_from_proto(wire.schedule.ok_or_else(|| missing("schedule"))?),
            eval: eval_from_proto(wire.eval.ok_or_else(|| missing("eval"))?),
            resources: resources_from_proto(wire.resources.ok_or_else(|| missing("resources"))?),
        };
        spec.validate()?;
        Ok(spec)
    }
}

fn model_from_proto(m: proto::ModelSpec) -> ModelSpec {
    ModelSpec {
        preset: m.preset,
        image_size: m.image_size,
        patch_size: m.patch_size,
        in_channels: m.in_channels,
        embed_dim: m.embed_dim,
        depth: m.depth,
        num_heads: m.num_heads,
        pred_depth: m.pred_depth,
        pred_dim: m.pred_dim,
    }
}

fn mask_from_proto(k: proto::MaskSpec) -> Result<MaskSpec, SpecError> {
    let mode = match proto::MaskMode::try_from(k.mode) {
        Ok(proto::MaskMode::Faithful) => MaskMode::Faithful,
        Ok(proto::MaskMode::Fixed) => MaskMode::Fixed,
        _ => return Err(bad_enum("mask.mode", k.mode, "faithful, fixed")),
    };
    Ok(MaskSpec {
        mode,
        num_targets: k.num_targets,
        target_scale: range_from_proto("mask.target_scale", k.target_scale)?,
        target_aspect: range_from_proto("mask.target_aspect", k.target_aspect)?,
        context_scale: range_from_proto("mask.context_scale", k.context_scale)?,
        context_aspect: range_from_proto("mask.context_aspect", k.context_aspect)?,
        min_keep: k.min_keep,
    })
}

fn conditioning_from_proto(c: proto::ConditioningSpec) -> Result<ConditioningSpec, SpecError> {
    let kind = match proto::Conditioning::try_from(c.kind) {
        Ok(proto::Conditioning::None) => Conditioning::None,
        Ok(proto::Conditioning::Ec) => Conditioning::Ec,
        _ => return Err(bad_enum("conditioning.kind", c.kind, "none, ec")),
    };
    let token = match proto::CondToken::try_from(c.token) {
        Ok(proto::CondToken::Learned) => CondToken::Learned,
        Ok(proto::CondToken::Position) => CondToken::Position,
        _ => return Err(bad_enum("conditioning.token", c.token, "learned, position")),
    };
    Ok(ConditioningSpec { kind, token, kernel: c.kernel, stride: c.stride })
}

fn optim_from_proto(o: proto::OptimSpec) -> Result<OptimSpec, SpecError> {
    Ok(OptimSpec {
        batch_size: o.batch_size,
        lr: o.lr,
        start_lr: o.start_lr,
        final_lr: o.final_lr,
        warmup_steps: o.warmup_steps,
        weight_decay: range_from_proto("optim.weight_decay", o.weight_decay)?,
        ema: range_from_proto("optim.ema", o.ema)?,
        grad_clip: o.grad_clip,
    })
}

fn data_from_proto(d: proto::DataSpec) -> Result<DataSpec, SpecError> {
    let dataset = match proto::DatasetKind::try_from(d.dataset) {
        Ok(proto::DatasetKind::FashionMnist) => DatasetKind::FashionMnist,
        Ok(proto::DatasetKind::Mnist) => DatasetKind::Mnist,
        Ok(proto::DatasetKind::ImageFolder) => DatasetKind::ImageFolder,
        Ok(proto::DatasetKind::Synthetic) => DatasetKind::Synthetic,
        _ => {
            return Err(bad_enum(
                "data.dataset",
                d.dataset,
                "fashion_mnist, mnist, image_folder, synthetic",
            ))
        }
    };
    Ok(DataSpec {
        dataset,
        path: d.path,
        num_workers: d.num_workers,
        prefetch: d.prefetch,
        crop_scale: range_from_proto("data.crop_scale", d.crop_scale)?,
    })
}

fn schedule_from_proto(s: proto::ScheduleSpec) -> ScheduleSpec {
    ScheduleSpec {
        steps: s.steps,
        log_every: s.log_every,
        checkpoint_every: s.checkpoint_every,
        eval_every: s.eval_every,
        rankme_every: s.rankme_every,
    }
}

fn eval_from_proto(e: proto::EvalSpec) -> EvalSpec {
    EvalSpec {
        enabled: e.enabled,
        probe_epochs: e.probe_epochs,
        probe_lr: e.probe_lr,
        pooled_kernel: e.pooled_kernel,
        pooled_stride: e.pooled_stride,
        max_train: e.max_train,
        max_test: e.max_test,
    }
}

fn resources_from_proto(r: proto::ResourceSpec) -> ResourceSpec {
    ResourceSpec { device: r.device, gpus: r.gpus, ranks: r.ranks, hosts: r.hosts }
}

fn bad_enum(field: &str, value: i32, allowed: &str) -> SpecError {
    let what = if value == 0 { "unspecified".to_string() } else { format!("unknown ({value})") };
    invalid(field, format!("is {what}; allowed: {allowed}"))
}

fn mask_mode_to_proto(mode: MaskMode) -> proto::MaskMode {
    match mode {
        MaskMode::Faithful => proto::MaskMode::Faithful,
        MaskMode::Fixed => proto::MaskMode::Fixed,
    }
}

fn conditioning_to_proto(kind: Conditioning) -> proto::Conditioning {
    match kind {
        Conditioning::None => proto::Conditioning::None,
        Conditioning::Ec => proto::Conditioning::Ec,
    }
}

fn cond_token_to_proto(token: CondToken) -> proto::CondToken {
    match token {
        CondToken::Learned => proto::CondToken::Learned,
        CondToken::Position => proto::CondToken::Position,
    }
}

fn dataset_to_proto(kind: DatasetKind) -> proto::DatasetKind {
    match kind {
        DatasetKind::FashionMnist => proto::DatasetKind::FashionMnist,
        DatasetKind::Mnist => proto::DatasetKind::Mnist,
        DatasetKind::ImageFolder => proto::DatasetKind::ImageFolder,
        DatasetKind::Synthetic => proto::DatasetKind::Synthetic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_survives_a_round_trip() {
        let mut spec =
            RunSpec { name: "round-trip".into(), seed: 7, priority: -3, ..Default::default() };
        spec.mask.mode = MaskMode::Fixed;
        spec.mask.context_scale = [0.4, 0.9];
        spec.conditioning.token = CondToken::Position;
        spec.data.dataset = DatasetKind::ImageFolder;
        spec.data.path = Some("/data/imagenet".into());
        spec.optim.ema = [0.99, 0.999];
        spec.eval.enabled = false;
        let wire = proto::RunSpec::from(&spec);
        let back = RunSpec::try_from(wire).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn missing_section_names_it() {
        let mut wire = proto::RunSpec::from(&RunSpec::default());
        wire.optim = None;
        let err = RunSpec::try_from(wire).unwrap_err();
        assert_eq!(err.field(), Some("optim"));
    }

    #[test]
    fn unspecified_enum_names_the_field_and_the_choices() {
        let mut wire = proto::RunSpec::from(&RunSpec::default());
        if let Some(c) = wire.conditioning.as_mut() {
            c.kind = 0;
        }
        let err = RunSpec::try_from(wire).unwrap_err();
        assert_eq!(err.field(), Some("conditioning.kind"));
        assert!(err.to_string().contains("none, ec"), "{err}");
    }

    #[test]
    fn conversion_validates() {
        let mut wire = proto::RunSpec::from(&RunSpec::default());
        if let Some(m) = wire.mask.as_mut() {
            m.context_scale = Some(proto::Range { low: 0.9, high: 0.2 });
        }
        let err = RunSpec::try_from(wire).unwrap_err();
        assert_eq!(err.field(), Some("mask.context_scale"));
    }
}
