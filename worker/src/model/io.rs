//! Saving and loading the weights of a whole [`EcIjepa`] as one
//! safetensors file.
//!
//! Keys are the public I-JEPA checkpoint's, grouped the way its
//! checkpoint dictionaries are: `encoder.<key>`, `predictor.<key>`,
//! `target_encoder.<key>` (without the `module.` of distributed wrappers).
//! Stripping the first component gives a state dict that the PyTorch
//! reference under `tests/parity/` loads with `strict=True`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tch::{Device, Tensor};

use super::{EcIjepa, ModelError};

fn checkpoint_error(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), message: message.into() }
}

impl EcIjepa {
    /// Returns every variable of the model (trainable or not), sorted by
    /// checkpoint key.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut all: Vec<(String, Tensor)> = self
            .var_store()
            .variables()
            .into_iter()
            .chain(self.target_var_store().variables())
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Writes every variable to `path` as safetensors, in f32 on the CPU.
    ///
    /// # Errors
    ///
    /// [`ModelError::Torch`] when the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let tensors: Vec<(String, Tensor)> = self
            .named_tensors()
            .into_iter()
            .map(|(name, t)| (name, t.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        Tensor::write_safetensors(&tensors, path)?;
        Ok(())
    }

    /// Loads every variable from a safetensors file written by
    /// [`EcIjepa::save`] (or by PyTorch with the same keys).
    ///
    /// # Errors
    ///
    /// [`ModelError::Checkpoint`] when a key is missing, has another shape,
    /// or the file holds keys this model does not have. Every check runs
    /// before the first value is copied, so the model is then unchanged.
    /// [`ModelError::Torch`] when the file cannot be read.
    pub fn load(&mut self, path: &Path) -> Result<(), ModelError> {
        let mut stored: HashMap<String, Tensor> =
            Tensor::read_safetensors(path)?.into_iter().collect();
        let mut ours = self.named_tensors();

        for (name, var) in &ours {
            let Some(src) = stored.get(name) else {
                return Err(checkpoint_error(path, format!("missing key {name}")));
            };
            if src.size() != var.size() {
                let message =
                    format!("key {name} has shape {:?}, the model {:?}", src.size(), var.size());
                return Err(checkpoint_error(path, message));
            }
        }
        let ours_names: HashSet<&str> = ours.iter().map(|(n, _)| n.as_str()).collect();
        let mut unknown: Vec<&String> =
            stored.keys().filter(|k| !ours_names.contains(k.as_str())).collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(checkpoint_error(path, format!("unknown keys {unknown:?}")));
        }

        tch::no_grad(|| -> Result<(), ModelError> {
            for (name, var) in ours.iter_mut() {
                let src = stored.remove(name).expect("presence checked above");
                var.f_copy_(&src)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CondConfig, ModelConfig};
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            image_size: 16,
            patch_size: 4,
            in_channels: 1,
            embed_dim: 16,
            depth: 1,
            num_heads: 2,
            pred_depth: 1,
            pred_dim: 8,
        }
    }

    #[test]
    fn weights_round_trip_through_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.safetensors");
        tch::manual_seed(1);
        let a = EcIjepa::new(&tiny(), &CondConfig::ec(), Device::Cpu).unwrap();
        a.save(&path).unwrap();
        tch::manual_seed(2);
        let mut b = EcIjepa::new(&tiny(), &CondConfig::ec(), Device::Cpu).unwrap();
        b.load(&path).unwrap();
        let (ta, tb) = (a.named_tensors(), b.named_tensors());
        assert_eq!(ta.len(), tb.len());
        for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
            assert_eq!(na, nb);
            assert!(va.equal(vb), "{na} differs after load");
        }
        let names: Vec<&str> = ta.iter().map(|(n, _)| n.as_str()).collect();
        for key in [
            "encoder.patch_embed.proj.weight",
            "encoder.pos_embed",
            "encoder.cond_token",
            "encoder.blocks.0.attn.qkv.bias",
            "encoder.blocks.0.mlp.fc2.weight",
            "encoder.norm.weight",
            "predictor.predictor_embed.weight",
            "predictor.mask_token",
            "predictor.predictor_pos_embed",
            "predictor.predictor_blocks.0.norm1.weight",
            "predictor.predictor_norm.bias",
            "predictor.predictor_proj.weight",
            "target_encoder.blocks.0.attn.proj.weight",
            "target_encoder.cond_token",
        ] {
            assert!(names.contains(&key), "{key} missing from {names:?}");
        }
    }

    #[test]
    fn loading_another_configuration_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.safetensors");
        EcIjepa::new(&tiny(), &CondConfig::none(), Device::Cpu).unwrap().save(&path).unwrap();
        let mut ec = EcIjepa::new(&tiny(), &CondConfig::ec(), Device::Cpu).unwrap();
        let err = ec.load(&path).unwrap_err().to_string();
        assert!(err.contains("missing key encoder.cond_token"), "{err}");

        let wider = ModelConfig { pred_dim: 16, ..tiny() };
        let mut other = EcIjepa::new(&wider, &CondConfig::none(), Device::Cpu).unwrap();
        let err = other.load(&path).unwrap_err().to_string();
        assert!(err.contains("has shape"), "{err}");
    }
}
