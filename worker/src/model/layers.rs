//! The building blocks of both ViTs: linear and norm layers, multi-head
//! attention, MLP and the pre-norm transformer block, with the I-JEPA
//! initialisation and the mixed-precision rule.
//!
//! Parameters are registered under their checkpoint names (`weight`,
//! `bias`, `qkv`, `proj`, `fc1`, ...) and sorted into the optimiser groups
//! [`DECAY_GROUP`] and [`NO_DECAY_GROUP`] as they are created.

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::config::{INIT_STD, LAYER_NORM_EPS, MLP_RATIO};

/// tch optimiser group of the parameters that get weight decay (weights of
/// two or more dimensions).
pub const DECAY_GROUP: usize = 0;

/// tch optimiser group of the parameters without weight decay (biases and
/// every 1-D parameter).
pub const NO_DECAY_GROUP: usize = 1;

/// Numeric precision of the forward pass.
///
/// `Bf16` applies the rule CUDA autocast applies to this model's
/// operations: matrix products (linear, convolution, attention) run in
/// bfloat16 on bfloat16 copies of their inputs and weights; layer norms
/// run in f32; element-wise operations follow their inputs, so the
/// residual stream stays f32 (f32 + bf16 promotes to f32). The casts are
/// explicit because `tch::autocast` enables CUDA autocast at its default
/// type, float16, and tch 0.24 offers no way to choose bfloat16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32; the CPU default and the parity setting.
    Fp32,
    /// bfloat16 matrix products, f32 norms and residuals; the CUDA default.
    Bf16,
}

impl Precision {
    /// Returns `t` in the type matrix products use.
    pub(crate) fn matmul_input(self, t: &Tensor) -> Tensor {
        match self {
            Precision::Fp32 => t.shallow_clone(),
            Precision::Bf16 => t.to_kind(Kind::BFloat16),
        }
    }
}

/// Returns a normal sample of std [`INIT_STD`] truncated to [-2, 2].
///
/// Like the public I-JEPA `trunc_normal_`, the bounds are absolute, which
/// at std 0.02 lie 100 standard deviations out: clamping a plain normal
/// sample gives the same distribution in practice.
pub(crate) fn trunc_normal(path: &Path, dims: &[i64]) -> Tensor {
    (Tensor::randn(dims, (Kind::Float, path.device())) * INIT_STD).clamp(-2.0, 2.0)
}

/// Registers a trainable parameter in the optimiser group its name and
/// shape call for: biases and 1-D tensors get no weight decay.
pub(crate) fn param(path: &Path, name: &str, value: Tensor) -> Tensor {
    let group = if name == "bias" || value.dim() <= 1 { NO_DECAY_GROUP } else { DECAY_GROUP };
    path.set_group(group).add(name, value, true)
}

/// A fully connected layer, `weight` `[out, in]` and `bias` `[out]`.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Creates the layer with truncated-normal weights, divided by `rescale`
    /// (1 for no rescaling), and zero bias.
    pub(crate) fn new(path: &Path, input: i64, output: i64, rescale: f64) -> Self {
        let weight = param(path, "weight", trunc_normal(path, &[output, input]) / rescale);
        let bias = param(path, "bias", Tensor::zeros([output], (Kind::Float, path.device())));
        Linear { weight, bias }
    }

    pub(crate) fn forward(&self, x: &Tensor, precision: Precision) -> Tensor {
        let weight = precision.matmul_input(&self.weight);
        let bias = precision.matmul_input(&self.bias);
        precision.matmul_input(x).linear(&weight, Some(&bias))
    }
}

/// LayerNorm over the last dimension with affine `weight` and `bias`.
#[derive(Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
}

impl LayerNorm {
    pub(crate) fn new(path: &Path, dim: i64) -> Self {
        let device = path.device();
        let weight = param(path, "weight", Tensor::ones([dim], (Kind::Float, device)));
        let bias = param(path, "bias", Tensor::zeros([dim], (Kind::Float, device)));
        LayerNorm { weight, bias, dim }
    }

    /// Normalises in f32 whatever the input type, as autocast does.
    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        x.to_kind(Kind::Float).layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            LAYER_NORM_EPS,
            true,
        )
    }
}

/// Multi-head self-attention with a fused `qkv` projection (with bias) and
/// an output projection `proj`.
#[derive(Debug)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: i64,
}

impl Attention {
    /// Runs attention over `[B, L, D]`; `keep` is an optional `[B, 1, 1, L]`
    /// boolean mask of the keys each token may attend to.
    fn forward(&self, x: &Tensor, keep: Option<&Tensor>, precision: Precision) -> Tensor {
        let (b, l, d) = x.size3().expect("attention input is [B, L, D]");
        let qkv = self.qkv.forward(x, precision).view([b, l, 3, self.heads, d / self.heads]);
        let qkv = qkv.permute([2, 0, 3, 1, 4]); // [3, B, H, L, D/H]
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, keep, 0.0, false, None, false);
        let out = out.transpose(1, 2).reshape([b, l, d]); // [B, L, D]
        self.proj.forward(&out, precision)
    }
}

/// Two-layer MLP `fc1` -> exact GELU -> `fc2` with hidden width 4 D.
#[derive(Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

/// A pre-norm transformer block: `x + attn(norm1(x))`, then
/// `x + mlp(norm2(x))`.
#[derive(Debug)]
pub(crate) struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    /// Creates block number `layer_id` (counted from 1).
    ///
    /// Following the public I-JEPA initialisation (METHOD.md is silent on
    /// it), the weights of `attn.proj` and `mlp.fc2` are divided by
    /// `sqrt(2 * layer_id)` so deeper blocks start with smaller residual
    /// updates.
    pub(crate) fn new(path: &Path, dim: i64, heads: i64, layer_id: i64) -> Self {
        let rescale = (2.0 * layer_id as f64).sqrt();
        let hidden = MLP_RATIO * dim;
        let attn_path = path / "attn";
        let mlp_path = path / "mlp";
        Block {
            norm1: LayerNorm::new(&(path / "norm1"), dim),
            attn: Attention {
                qkv: Linear::new(&(&attn_path / "qkv"), dim, 3 * dim, 1.0),
                proj: Linear::new(&(&attn_path / "proj"), dim, dim, rescale),
                heads,
            },
            norm2: LayerNorm::new(&(path / "norm2"), dim),
            mlp: Mlp {
                fc1: Linear::new(&(&mlp_path / "fc1"), dim, hidden, 1.0),
                fc2: Linear::new(&(&mlp_path / "fc2"), hidden, dim, rescale),
            },
        }
    }

    /// Runs the block over `[B, L, D]`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        keep: Option<&Tensor>,
        precision: Precision,
    ) -> Tensor {
        let x = x + self.attn.forward(&self.norm1.forward(x), keep, precision);
        let hidden = self.mlp.fc1.forward(&self.norm2.forward(&x), precision).gelu("none");
        &x + self.mlp.fc2.forward(&hidden, precision)
    }
}

/// Returns `x` at the given token indices: `[B, N, C]` gathered with
/// `[B, K]` gives `[B, K, C]`. A `[1, N, C]` table is broadcast over B.
pub(crate) fn gather_tokens(x: &Tensor, indices: &Tensor) -> Tensor {
    let (b, k) = indices.size2().expect("indices are [B, K]");
    let (_, n, c) = x.size3().expect("tokens are [B, N, C]");
    let x = x.expand([b, n, c], false);
    x.gather(1, &indices.unsqueeze(-1).expand([b, k, c], false), false) // [B, K, C]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::Device;

    #[test]
    fn parameters_land_in_their_weight_decay_groups() {
        let vs = VarStore::new(Device::Cpu);
        let _block = Block::new(&vs.root(), 8, 2, 1);
        let variables = vs.variables_.lock().unwrap();
        let groups: Vec<(usize, i64)> = variables
            .trainable_variables
            .iter()
            .map(|v| (v.group, v.tensor.dim() as i64))
            .collect();
        assert_eq!(groups.len(), 12);
        for (group, dim) in groups {
            let want = if dim > 1 { DECAY_GROUP } else { NO_DECAY_GROUP };
            assert_eq!(group, want);
        }
    }

    #[test]
    fn deeper_blocks_start_with_rescaled_output_weights() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let _shallow = Block::new(&(vs.root() / "a"), 64, 4, 1);
        let _deep = Block::new(&(vs.root() / "b"), 64, 4, 8);
        let std = |name: &str| vs.variables()[name].std(true).double_value(&[]);
        // Block 1 divides by sqrt(2), block 8 by 4: a ratio of 2 sqrt(2).
        let ratio = std("a.mlp.fc2.weight") / std("b.mlp.fc2.weight");
        assert!((ratio - 8f64.sqrt()).abs() < 0.1, "{ratio}");
        let qkv = std("b.attn.qkv.weight");
        assert!((qkv - INIT_STD).abs() < 0.002, "{qkv}");
    }

    #[test]
    fn gather_tokens_picks_rows_per_sample() {
        let x = Tensor::arange(2 * 4 * 3, (Kind::Float, Device::Cpu)).view([2, 4, 3]);
        let idx = Tensor::from_slice(&[3i64, 0, 1, 1]).view([2, 2]);
        let out = gather_tokens(&x, &idx);
        assert_eq!(out.size(), [2, 2, 3]);
        assert_eq!(out.double_value(&[0, 0, 0]), 9.0);
        assert_eq!(out.double_value(&[1, 1, 2]), 12.0 + 3.0 + 2.0);
    }
}
