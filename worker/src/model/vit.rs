//! The ViT encoder used as context encoder and as target encoder: Conv2d
//! patch embedding, fixed sin-cos positions, pre-norm blocks, final
//! LayerNorm, no class token (METHOD.md section 4), plus the optional EC
//! conditioning tokens appended after the patch tokens (section 2).
//!
//! Variable-store paths are the public I-JEPA encoder keys:
//! `patch_embed.proj.{weight,bias}`, `pos_embed` (fixed, not trainable),
//! `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
//! `norm.*`, and `cond_token` `[1, 1, D]` for the learned EC token.

use tch::nn::Path;
use tch::{Kind, Tensor};

use super::conditioning::CondTokens;
use super::config::{CondConfig, ModelConfig};
use super::layers::{gather_tokens, param, trunc_normal, Block, LayerNorm, Precision};
use super::pos_embed::sincos_tensor;

/// A ViT encoder over the patch grid.
#[derive(Debug)]
pub struct VisionTransformer {
    patch_weight: Tensor,
    patch_bias: Tensor,
    pos_embed: Tensor,
    cond_token: Option<Tensor>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    patch_size: i64,
}

impl VisionTransformer {
    /// Creates the encoder's variables under `path` with the I-JEPA
    /// initialisation; `cond_token` is created only for a learned EC token.
    pub fn new(path: &Path, config: &ModelConfig, cond: &CondConfig) -> Self {
        let (d, p) = (config.embed_dim, config.patch_size);
        let proj = path / "patch_embed" / "proj";
        let patch_weight =
            param(&proj, "weight", trunc_normal(path, &[d, config.in_channels, p, p]));
        let patch_bias = param(&proj, "bias", Tensor::zeros([d], (Kind::Float, path.device())));
        let table = sincos_tensor(d, config.grid(), config.grid(), path.device());
        let pos_embed = path.add("pos_embed", table, false);
        let cond_token = cond
            .has_learned_token()
            .then(|| param(path, "cond_token", trunc_normal(path, &[1, 1, d])));
        let blocks_path = path / "blocks";
        let blocks = (0..config.depth)
            .map(|i| Block::new(&(&blocks_path / i), d, config.num_heads, i + 1))
            .collect();
        let norm = LayerNorm::new(&(path / "norm"), d);
        VisionTransformer {
            patch_weight,
            patch_bias,
            pos_embed,
            cond_token,
            blocks,
            norm,
            patch_size: p,
        }
    }

    /// Returns the fixed position table, `[1, N, D]`.
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    /// Embeds images `[B, C, H, W]` as patch tokens plus positions,
    /// `[B, N, D]`.
    pub fn patch_tokens(&self, images: &Tensor, precision: Precision) -> Tensor {
        let weight = precision.matmul_input(&self.patch_weight);
        let bias = precision.matmul_input(&self.patch_bias);
        let x = precision.matmul_input(images).conv2d(
            &weight,
            Some(&bias),
            [self.patch_size, self.patch_size],
            [0, 0],
            [1, 1],
            1,
        ); // [B, D, h, w]
        let x = x.flatten(2, 3).transpose(1, 2); // [B, N, D]
        x + &self.pos_embed
    }

    /// Encodes images `[B, C, H, W]`.
    ///
    /// `keep` `[B, K]` selects the patch tokens the encoder sees (all when
    /// `None`); `cond` appends conditioning tokens, which attend and are
    /// attended to in every block and are dropped before the final norm.
    /// Returns `[B, K, D]` (or `[B, N, D]`), normalised.
    pub(crate) fn forward(
        &self,
        images: &Tensor,
        keep: Option<&Tensor>,
        cond: Option<&CondTokens>,
        precision: Precision,
    ) -> Tensor {
        let x = self.patch_tokens(images, precision); // [B, N, D]
        let x = match keep {
            Some(indices) => gather_tokens(&x, indices), // [B, K, D]
            None => x,
        };
        let patches = x.size()[1];
        let (mut x, mask) = match cond {
            Some(tokens) => {
                let positions = tokens.positions(&self.pos_embed); // [B, T, D]
                let extra = match &self.cond_token {
                    Some(c) => positions + c,
                    None => positions,
                };
                (Tensor::cat(&[x, extra], 1), tokens.attention_mask(patches)) // [B, K + T, D]
            }
            None => (x, None),
        };
        for block in &self.blocks {
            x = block.forward(&x, mask.as_ref(), precision);
        }
        self.norm.forward(&x.narrow(1, 0, patches)) // [B, K, D]
    }
}
