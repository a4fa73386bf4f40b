//! Sizes of the encoders and the predictor, and the EC conditioning
//! settings (METHOD.md sections 2 and 4); field names follow the run spec.

use super::ModelError;

/// Hidden width of every MLP as a multiple of its input width.
///
/// METHOD.md fixes 4 for every preset. The public I-JEPA `vit_giant` uses
/// 48/11 instead (hidden width 6144); this project's `giant` keeps 4.
pub const MLP_RATIO: i64 = 4;

/// Epsilon of every LayerNorm inside the encoders and the predictor.
pub const LAYER_NORM_EPS: f64 = 1e-6;

/// Standard deviation of the truncated-normal initialisation.
pub const INIT_STD: f64 = 0.02;

/// Named sizes: (name, D, depth, heads, predictor depth, predictor width),
/// shared with the run spec so the two can never disagree.
pub use jepa_common::spec::PRESETS;

/// Size of the ViT encoders and of the predictor.
///
/// The predictor uses the encoder's head count, as the public I-JEPA code
/// does, so `pred_dim` must be a multiple of `num_heads`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// Side of the square input image in pixels.
    pub image_size: i64,
    /// Side of a square patch in pixels; divides `image_size`.
    pub patch_size: i64,
    /// Input channels: 1 (grey) or 3 (RGB).
    pub in_channels: i64,
    /// Encoder width D.
    pub embed_dim: i64,
    /// Encoder blocks.
    pub depth: i64,
    /// Attention heads of encoder and predictor.
    pub num_heads: i64,
    /// Predictor blocks.
    pub pred_depth: i64,
    /// Predictor width.
    pub pred_dim: i64,
}

impl ModelConfig {
    /// Returns the named preset at the given image size, patch size and
    /// channel count.
    ///
    /// # Errors
    ///
    /// [`ModelError::Invalid`] on `model.preset` for an unknown name, or on
    /// the first size field that does not fit.
    pub fn preset(
        name: &str,
        image_size: i64,
        patch_size: i64,
        in_channels: i64,
    ) -> Result<Self, ModelError> {
        let Some(&(_, d, depth, heads, pd, pw)) = PRESETS.iter().find(|p| p.0 == name) else {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
            let message = format!("unknown preset {name:?}; allowed: {}", names.join(", "));
            return Err(ModelError::invalid("model.preset", message));
        };
        let config = ModelConfig {
            image_size,
            patch_size,
            in_channels,
            embed_dim: i64::from(d),
            depth: i64::from(depth),
            num_heads: i64::from(heads),
            pred_depth: i64::from(pd),
            pred_dim: i64::from(pw),
        };
        config.validate()?;
        Ok(config)
    }

    /// Returns the side of the patch grid.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Returns the number of patches N.
    pub fn num_patches(&self) -> i64 {
        self.grid() * self.grid()
    }

    /// Checks every field, naming the first one that is wrong.
    ///
    /// # Errors
    ///
    /// [`ModelError::Invalid`] with the field's dotted name.
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("model.image_size", self.image_size),
            ("model.patch_size", self.patch_size),
            ("model.depth", self.depth),
            ("model.num_heads", self.num_heads),
            ("model.pred_depth", self.pred_depth),
        ];
        for (field, value) in positive {
            if value < 1 {
                return Err(ModelError::invalid(field, format!("is {value}; must be >= 1")));
            }
        }
        if self.image_size % self.patch_size != 0 || self.grid() < 2 {
            let message = format!(
                "{} must divide model.image_size {} into a grid of at least 2 x 2",
                self.patch_size, self.image_size
            );
            return Err(ModelError::invalid("model.patch_size", message));
        }
        if self.in_channels != 1 && self.in_channels != 3 {
            let message = format!("is {}; allowed: 1 or 3", self.in_channels);
            return Err(ModelError::invalid("model.in_channels", message));
        }
        for (field, width) in
            [("model.embed_dim", self.embed_dim), ("model.pred_dim", self.pred_dim)]
        {
            // The 2-D sin-cos table splits the width into four equal parts.
            if width < 4 || width % 4 != 0 || width % self.num_heads != 0 {
                let message = format!(
                    "is {width}; must be a positive multiple of 4 and of model.num_heads ({})",
                    self.num_heads
                );
                return Err(ModelError::invalid(field, message));
            }
        }
        Ok(())
    }

    /// Returns the trainable parameters of one encoder, in closed form.
    ///
    /// Patch embedding `C p^2 D + D`; each block `12 D^2 + 13 D` (two norms
    /// `4D`, qkv `3D^2 + 3D`, proj `D^2 + D`, fc1 `4D^2 + 4D`, fc2
    /// `4D^2 + D`); final norm `2D`; the learned conditioning token `D` when
    /// there is one. The fixed position table is not counted.
    pub fn encoder_params(&self, cond: &CondConfig) -> i64 {
        let d = self.embed_dim;
        let patch = self.in_channels * self.patch_size * self.patch_size * d + d;
        let token = if cond.has_learned_token() { d } else { 0 };
        patch + self.depth * block_params(d) + 2 * d + token
    }

    /// Returns the trainable parameters of the predictor, in closed form:
    /// embedding `D Dp + Dp`, mask token `Dp`, blocks, norm `2 Dp`,
    /// projection `Dp D + D`.
    pub fn predictor_params(&self) -> i64 {
        let (d, p) = (self.embed_dim, self.pred_dim);
        (d * p + p) + p + self.pred_depth * block_params(p) + 2 * p + (p * d + d)
    }
}

/// Parameters of one pre-norm block of width `d` with MLP ratio 4.
fn block_params(d: i64) -> i64 {
    let hidden = MLP_RATIO * d;
    4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d)
}

/// Whether the encoders see conditioning tokens of the other window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Conditioning {
    /// Plain I-JEPA: no conditioning tokens anywhere.
    None,
    /// EC-IJEPA: context encoder conditioned on the target blocks, target
    /// encoder on the context block.
    #[default]
    Ec,
}

/// What a conditioning token holds besides its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CondToken {
    /// A learned vector `c` (parameter `cond_token`) plus the position.
    #[default]
    Learned,
    /// The position embedding alone (`c = 0`, no parameter).
    Position,
}

/// EC conditioning settings (METHOD.md section 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CondConfig {
    /// `none` or `ec`.
    pub kind: Conditioning,
    /// Learned token or position only.
    pub token: CondToken,
    /// Side of the pooling window over the grid.
    pub kernel: i64,
    /// Stride of the pooling window.
    pub stride: i64,
}

impl Default for CondConfig {
    fn default() -> Self {
        CondConfig::ec()
    }
}

impl CondConfig {
    /// Returns plain I-JEPA: no conditioning.
    pub fn none() -> Self {
        CondConfig { kind: Conditioning::None, token: CondToken::Learned, kernel: 1, stride: 1 }
    }

    /// Returns EC-IJEPA with a learned token and one token per position.
    pub fn ec() -> Self {
        CondConfig { kind: Conditioning::Ec, token: CondToken::Learned, kernel: 1, stride: 1 }
    }

    /// Returns whether conditioning tokens are used at all.
    pub fn is_ec(&self) -> bool {
        self.kind == Conditioning::Ec
    }

    /// Returns whether the encoders own a `cond_token` parameter.
    pub fn has_learned_token(&self) -> bool {
        self.is_ec() && self.token == CondToken::Learned
    }

    /// Checks kernel and stride against a `grid` x `grid` patch grid.
    ///
    /// # Errors
    ///
    /// [`ModelError::Invalid`] on `conditioning.kernel` or
    /// `conditioning.stride` when outside 1 to `grid`.
    pub fn validate(&self, grid: i64) -> Result<(), ModelError> {
        for (field, value) in
            [("conditioning.kernel", self.kernel), ("conditioning.stride", self.stride)]
        {
            if !(1..=grid).contains(&value) {
                let message = format!("is {value}; allowed: 1 to the grid side {grid}");
                return Err(ModelError::invalid(field, message));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_documented_parameter_counts() {
        // Trainable parameters at 224 px, patch 16, RGB, learned EC token.
        // Cross-check: base without the token, 85,646,592, is timm's
        // ViT-B/16 (86,567,656) less head, class token and position table.
        let expected = [
            ("tiny", 5_486_592, 2_743_872),
            ("small", 21_590_016, 10_943_616),
            ("base", 85_647_360, 11_238_912),
            ("large", 303_099_904, 22_082_560),
            ("huge", 630_666_240, 22_279_424),
            ("giant", 953_401_856, 29_475_712),
        ];
        let ec = CondConfig::ec();
        for (name, encoder, predictor) in expected {
            let config = ModelConfig::preset(name, 224, 16, 3).unwrap();
            assert_eq!(config.encoder_params(&ec), encoder, "{name} encoder");
            assert_eq!(config.predictor_params(), predictor, "{name} predictor");
            let none = config.encoder_params(&CondConfig::none());
            assert_eq!(encoder - none, config.embed_dim, "{name} cond token");
        }
    }

    #[test]
    fn invalid_sizes_name_their_field() {
        let good = ModelConfig::preset("tiny", 32, 4, 3).unwrap();
        let cases = [
            ("model.patch_size", ModelConfig { patch_size: 5, ..good.clone() }),
            ("model.patch_size", ModelConfig { patch_size: 32, ..good.clone() }),
            ("model.in_channels", ModelConfig { in_channels: 2, ..good.clone() }),
            ("model.embed_dim", ModelConfig { embed_dim: 190, ..good.clone() }),
            ("model.pred_dim", ModelConfig { pred_dim: 100, ..good.clone() }),
            ("model.depth", ModelConfig { depth: 0, ..good.clone() }),
        ];
        for (field, config) in cases {
            let err = config.validate().unwrap_err();
            assert_eq!(err.field(), Some(field), "{err}");
        }
        let err = ModelConfig::preset("enormous", 224, 16, 3).unwrap_err();
        assert_eq!(err.field(), Some("model.preset"));
        let err = CondConfig { kernel: 9, ..CondConfig::ec() }.validate(8).unwrap_err();
        assert_eq!(err.field(), Some("conditioning.kernel"));
        let err = CondConfig { stride: 0, ..CondConfig::ec() }.validate(8).unwrap_err();
        assert_eq!(err.field(), Some("conditioning.stride"));
    }
}
