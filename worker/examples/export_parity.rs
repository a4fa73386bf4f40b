//! Exports what the PyTorch parity check (`tests/parity/check_parity.py`,
//! run by `make parity`) compares against its own reference model.
//!
//! For each conditioning case it writes `<case>_weights.safetensors` (the
//! whole model, I-JEPA keys) and `<case>_data.safetensors` (images, masks
//! and every Rust output: context-encoder output, target features,
//! predictions, loss, gradients, evaluation features, the target encoder
//! after one EMA step, token counts), plus `manifest.json` with the sizes.
//!
//! Usage: `cargo run -p jepa-worker --example export_parity -- OUT_DIR`

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use jepa_worker::masks::{MaskBatch, MaskConfig, MaskSampler};
use jepa_worker::model::{CondConfig, CondToken, EcIjepa, ModelConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// EMA momentum of the exported update: far from 1 so the step is visible.
const EMA_MOMENTUM: f64 = 0.75;

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/parity".into()));
    fs::create_dir_all(&out).with_context(|| format!("failed to create {}", out.display()))?;
    tch::set_num_threads(1);

    // 32 px RGB at patch 4: an 8 x 8 grid, small enough for two CPU cores.
    let config = ModelConfig {
        image_size: 32,
        patch_size: 4,
        in_channels: 3,
        embed_dim: 64,
        depth: 2,
        num_heads: 4,
        pred_depth: 2,
        pred_dim: 32,
    };
    let sampler = MaskSampler::new(MaskConfig { min_keep: 4, ..MaskConfig::ijepa(8, 8) })?;
    let masks = sampler.sample(7, 4, &mut ChaCha8Rng::seed_from_u64(42))?;
    tch::manual_seed(0);
    let images = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));

    let position = CondConfig { token: CondToken::Position, ..CondConfig::ec() };
    let cases = [
        ("none", CondConfig::none()),
        ("ec", CondConfig::ec()),
        ("ec_position", position),
        ("ec_pool2", CondConfig { kernel: 2, stride: 2, ..CondConfig::ec() }),
        ("ec_pool3_stride2", CondConfig { kernel: 3, stride: 2, ..CondConfig::ec() }),
    ];
    let mut manifest = Vec::new();
    for (name, cond) in &cases {
        export_case(&out, name, &config, cond, &images, &masks)
            .with_context(|| format!("failed to export case {name}"))?;
        manifest.push(serde_json::json!({
            "name": name,
            "conditioning": if cond.is_ec() { "ec" } else { "none" },
            "learned_token": cond.has_learned_token(),
            "kernel": cond.kernel,
            "stride": cond.stride,
        }));
    }
    let manifest = serde_json::json!({
        "model": {
            "image_size": config.image_size,
            "patch_size": config.patch_size,
            "in_channels": config.in_channels,
            "embed_dim": config.embed_dim,
            "depth": config.depth,
            "num_heads": config.num_heads,
            "pred_depth": config.pred_depth,
            "pred_dim": config.pred_dim,
        },
        "ema_momentum": EMA_MOMENTUM,
        "cases": manifest,
    });
    let path = out.join("manifest.json");
    fs::write(&path, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("failed to write {}", path.display()))?;
    println!("exported {} cases to {}", cases.len(), out.display());
    Ok(())
}

fn export_case(
    out: &Path,
    name: &str,
    config: &ModelConfig,
    cond: &CondConfig,
    images: &Tensor,
    masks: &MaskBatch,
) -> anyhow::Result<()> {
    tch::manual_seed(1);
    let mut model = EcIjepa::new(config, cond, Device::Cpu)?;
    // Let the context side drift from the target encoder, so swapping the
    // two encoders anywhere would show in the comparison.
    tch::no_grad(|| {
        for t in model.var_store().trainable_variables() {
            let noise = Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.05;
            let _ = t.shallow_clone().g_add_(&noise);
        }
    });
    model.save(&out.join(format!("{name}_weights.safetensors")))?;

    let outputs = model.forward(images, masks)?;
    outputs.loss.backward();
    let features = model.target_features(images)?;
    let counts = model.token_counts(masks);

    let mut tensors: Vec<(String, Tensor)> = vec![
        ("images".into(), images.shallow_clone()),
        ("context_indices".into(), stack(masks.context())),
        (
            "target_indices".into(),
            Tensor::stack(&masks.targets().iter().map(|m| stack(m)).collect::<Vec<_>>(), 0),
        ),
        ("context_out".into(), outputs.context.detach()),
        ("targets_out".into(), outputs.targets.detach()),
        ("predictions_out".into(), outputs.predictions.detach()),
        ("loss".into(), outputs.loss.detach().view([1])),
        ("features_out".into(), features),
        ("context_tokens".into(), counts_tensor(&counts.context)),
        ("target_tokens".into(), counts_tensor(&counts.target)),
    ];
    for (param, t) in model.var_store().variables() {
        if t.requires_grad() {
            tensors.push((format!("grad.{param}"), t.grad()));
        }
    }
    model.ema_update(EMA_MOMENTUM);
    for (param, t) in model.target_var_store().variables() {
        tensors.push((format!("ema.{param}"), t));
    }
    let tensors: Vec<(String, Tensor)> =
        tensors.into_iter().map(|(n, t)| (n, t.detach().contiguous())).collect();
    let path = out.join(format!("{name}_data.safetensors"));
    Tensor::write_safetensors(&tensors, &path)
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

/// Stacks equal-length index lists into `[rows, len]`.
fn stack(lists: &[Vec<i64>]) -> Tensor {
    Tensor::from_slice(&lists.concat()).view([lists.len() as i64, -1])
}

fn counts_tensor(counts: &[usize]) -> Tensor {
    Tensor::from_slice(&counts.iter().map(|&c| c as i64).collect::<Vec<_>>())
}
