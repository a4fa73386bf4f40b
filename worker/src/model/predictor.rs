//! The narrow ViT predictor: from the context encoder's output and the
//! positions of a target block, predicts the target encoder's features at
//! that block (METHOD.md section 1). Unchanged by EC conditioning.
//!
//! As in the public I-JEPA code, the batch is repeated once per target
//! block: with M blocks the predictor runs on M * B rows, block m of image
//! b in row `m * B + b`.
//!
//! Variable-store paths are the public I-JEPA predictor keys:
//! `predictor_embed.*`, `mask_token` `[1, 1, Dp]`, `predictor_pos_embed`
//! (fixed, not trainable), `predictor_blocks.{i}.*`, `predictor_norm.*`,
//! `predictor_proj.*`.

use tch::nn::Path;
use tch::Tensor;

use super::config::ModelConfig;
use super::layers::{gather_tokens, param, trunc_normal, Block, LayerNorm, Linear, Precision};
use super::pos_embed::sincos_tensor;

/// The I-JEPA predictor.
#[derive(Debug)]
pub struct Predictor {
    predictor_embed: Linear,
    mask_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    proj: Linear,
}

impl Predictor {
    /// Creates the predictor's variables under `path` with the I-JEPA
    /// initialisation (blocks rescaled like the encoder's).
    pub fn new(path: &Path, config: &ModelConfig) -> Self {
        let (d, p) = (config.embed_dim, config.pred_dim);
        let table = sincos_tensor(p, config.grid(), config.grid(), path.device());
        let blocks_path = path / "predictor_blocks";
        Predictor {
            predictor_embed: Linear::new(&(path / "predictor_embed"), d, p, 1.0),
            mask_token: param(path, "mask_token", trunc_normal(path, &[1, 1, p])),
            pos_embed: path.add("predictor_pos_embed", table, false),
            blocks: (0..config.pred_depth)
                .map(|i| Block::new(&(&blocks_path / i), p, config.num_heads, i + 1))
                .collect(),
            norm: LayerNorm::new(&(path / "predictor_norm"), p),
            proj: Linear::new(&(path / "predictor_proj"), p, d, 1.0),
        }
    }

    /// Predicts target features.
    ///
    /// `context` is the context encoder's output `[B, Nc, D]` at the
    /// positions `context_indices` `[B, Nc]`; `targets` holds M index
    /// tensors `[B, Nt]`. Returns `[M * B, Nt, D]`.
    pub fn forward(
        &self,
        context: &Tensor,
        context_indices: &Tensor,
        targets: &[Tensor],
        precision: Precision,
    ) -> Tensor {
        let m = targets.len() as i64;
        let x = self.predictor_embed.forward(context, precision); // [B, Nc, Dp]
        let x = x + gather_tokens(&self.pos_embed, context_indices);
        let context_len = x.size()[1];

        let target_indices = Tensor::cat(targets, 0); // [M*B, Nt]
        let target_len = target_indices.size()[1];
        // [M*B, Nt, Dp]
        let queries = gather_tokens(&self.pos_embed, &target_indices) + &self.mask_token;
        let mut x = Tensor::cat(&[x.repeat([m, 1, 1]), queries], 1); // [M*B, Nc + Nt, Dp]

        for block in &self.blocks {
            x = block.forward(&x, None, precision);
        }
        let x = self.norm.forward(&x.narrow(1, context_len, target_len)); // [M*B, Nt, Dp]
        self.proj.forward(&x, precision) // [M*B, Nt, D]
    }
}
