//! AdamW over the two parameter groups, written out so that its state (the
//! moment estimates and the step count) can be checkpointed and restored
//! exactly; libtorch's optimiser wrapper in tch exposes no state.

use tch::{Kind, Tensor};

/// Adam's fixed coefficients (METHOD.md section 5).
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

struct Param {
    name: String,
    tensor: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

/// Decoupled-weight-decay Adam (Loshchilov and Hutter), matching
/// `torch.optim.AdamW` step for step.
pub struct AdamW {
    params: Vec<Param>,
    steps: i64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("params", &self.params.len())
            .field("steps", &self.steps)
            .finish()
    }
}

impl AdamW {
    /// An optimiser over `decay` (weight-decayed) and `no_decay` parameters.
    pub fn new(decay: Vec<(String, Tensor)>, no_decay: Vec<(String, Tensor)>) -> Self {
        let tagged =
            decay.into_iter().map(|p| (p, true)).chain(no_decay.into_iter().map(|p| (p, false)));
        let params = tagged
            .map(|((name, tensor), decay)| Param {
                exp_avg: tensor.zeros_like(),
                exp_avg_sq: tensor.zeros_like(),
                name,
                tensor,
                decay,
            })
            .collect();
        AdamW { params, steps: 0 }
    }

    /// Number of steps taken.
    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// Returns the trained tensors, for gradient all-reduce and clipping.
    pub fn tensors(&self) -> Vec<&Tensor> {
        self.params.iter().map(|p| &p.tensor).collect()
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`;
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> =
            self.params.iter().map(|p| p.tensor.grad()).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.norm().to_kind(Kind::Float)).collect();
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if total > max_norm {
            let scale = max_norm / (total + 1e-6);
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(scale);
                }
            });
        }
        total
    }

    /// Takes one step with learning rate `lr` and weight decay `wd` (applied
    /// to the decay group only).
    pub fn step(&mut self, lr: f64, wd: f64) {
        self.steps += 1;
        let bias1 = 1.0 - BETA1.powi(self.steps as i32);
        let bias2 = 1.0 - BETA2.powi(self.steps as i32);
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                if p.decay && wd != 0.0 {
                    let _ = p.tensor.g_mul_scalar_(1.0 - lr * wd);
                }
                let _ = p.exp_avg.g_mul_scalar_(BETA1);
                p.exp_avg += &grad * (1.0 - BETA1);
                let _ = p.exp_avg_sq.g_mul_scalar_(BETA2);
                p.exp_avg_sq += grad.square() * (1.0 - BETA2);
                let denom = p.exp_avg_sq.sqrt() / bias2.sqrt() + EPS;
                p.tensor -= (&p.exp_avg / denom) * (lr / bias1);
            }
        });
    }

    /// Returns the state as named tensors (`optim.exp_avg.<param>`,
    /// `optim.exp_avg_sq.<param>`), the step count apart.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for p in &self.params {
            out.push((format!("optim.exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            out.push((format!("optim.exp_avg_sq.{}", p.name), p.exp_avg_sq.shallow_clone()));
        }
        out
    }

    /// Restores the state written by [`AdamW::state`].
    ///
    /// # Errors
    ///
    /// Names the first moment tensor that is missing or has another shape.
    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
        steps: i64,
    ) -> Result<(), String> {
        for p in &mut self.params {
            for (kind, slot) in [("exp_avg", &mut p.exp_avg), ("exp_avg_sq", &mut p.exp_avg_sq)] {
                let key = format!("optim.{kind}.{}", p.name);
                let saved = tensors.get(&key).ok_or_else(|| format!("missing {key}"))?;
                if saved.size() != slot.size() {
                    return Err(format!(
                        "{key} has shape {:?}, expected {:?}",
                        saved.size(),
                        slot.size()
                    ));
                }
                tch::no_grad(|| slot.copy_(saved));
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_step_matches_the_adamw_formula() {
        let w = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
        let mut opt = AdamW::new(
            vec![("w".into(), w.shallow_clone())],
            vec![("b".into(), b.shallow_clone())],
        );
        // loss = sum(w^2) + 3 b: grad w = 2w, grad b = 3.
        let loss = w.square().sum(Kind::Float) + &b * 3.0;
        loss.sum(Kind::Float).backward();
        opt.step(0.1, 0.5);
        // First Adam step moves each weight by lr * sign(grad) (bias-corrected
        // m / sqrt(v) = g / |g|), after decoupled decay of the decay group.
        let got: Vec<f32> = Vec::try_from(&w).unwrap();
        let expected = [1.0 * (1.0 - 0.05) - 0.1, -2.0 * (1.0 - 0.05) + 0.1];
        for (g, e) in got.iter().zip(expected) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{g} vs {e}");
        }
        assert!((b.double_value(&[0]) - 0.4).abs() < 1e-6, "no decay on the bias group");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let w = Tensor::from_slice(&[3.0f32, 4.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], vec![]);
        (w.square().sum(Kind::Float) * 0.5).backward(); // grad = w, norm 5
        assert!((opt.clip_grad_norm(1.0) - 5.0).abs() < 1e-5);
        let clipped = w.grad().norm().double_value(&[]);
        assert!((clipped - 1.0).abs() < 1e-4, "{clipped}");
    }

    #[test]
    fn state_round_trips() {
        let w = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("w".into(), w.shallow_clone())], vec![]);
        w.square().sum(Kind::Float).backward();
        opt.step(0.01, 0.0);
        let saved: std::collections::HashMap<String, Tensor> =
            opt.state().into_iter().map(|(k, t)| (k, t.copy())).collect();
        let mut fresh = AdamW::new(vec![("w".into(), w.shallow_clone())], vec![]);
        fresh.load_state(&saved, opt.steps()).unwrap();
        assert_eq!(fresh.steps(), 1);
        let a = fresh.state()[1].1.double_value(&[0]);
        assert!((a - saved["optim.exp_avg_sq.w"].double_value(&[0])).abs() < 1e-12);
        let err = fresh.load_state(&std::collections::HashMap::new(), 1).unwrap_err();
        assert!(err.contains("optim.exp_avg.w"), "{err}");
    }
}
