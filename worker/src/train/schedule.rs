//! The three schedules of METHOD.md section 5, as pure functions of the
//! step: learning rate (linear warm-up, then cosine), weight decay
//! (cosine-shaped rise) and EMA momentum (linear rise).
//!
//! The public I-JEPA code stretches its schedules by a factor 1.25 past the
//! end of training; this project ends them at the last step (docs/trainer.md).

use std::f64::consts::PI;

use jepa_common::spec::OptimSpec;

/// Values of all schedules for one run of `total` steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedules {
    optim: OptimSpec,
    total: u64,
}

impl Schedules {
    /// Schedules of a run of `total` optimiser steps.
    pub fn new(optim: &OptimSpec, total: u64) -> Self {
        Schedules { optim: optim.clone(), total: total.max(1) }
    }

    /// Learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let o = &self.optim;
        if step < o.warmup_steps {
            let progress = step as f64 / o.warmup_steps as f64;
            return o.start_lr + progress * (o.lr - o.start_lr);
        }
        let span = (self.total - o.warmup_steps).max(1) as f64;
        let progress = ((step - o.warmup_steps) as f64 / span).min(1.0);
        o.final_lr + (o.lr - o.final_lr) * 0.5 * (1.0 + (PI * progress).cos())
    }

    /// Weight decay of step `step`: from `weight_decay[0]` to
    /// `weight_decay[1]` along half a cosine.
    pub fn weight_decay(&self, step: u64) -> f64 {
        let [first, last] = self.optim.weight_decay;
        let progress = (step as f64 / self.total as f64).min(1.0);
        last + (first - last) * 0.5 * (1.0 + (PI * progress).cos())
    }

    /// EMA momentum of step `step`: linear from `ema[0]` to `ema[1]`.
    pub fn momentum(&self, step: u64) -> f64 {
        let [first, last] = self.optim.ema;
        let progress = (step as f64 / self.total as f64).min(1.0);
        first + (last - first) * progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedules() -> Schedules {
        let optim = OptimSpec {
            lr: 1e-3,
            start_lr: 1e-4,
            final_lr: 1e-6,
            warmup_steps: 10,
            weight_decay: [0.04, 0.4],
            ema: [0.996, 1.0],
            ..Default::default()
        };
        Schedules::new(&optim, 110)
    }

    #[test]
    fn lr_warms_up_linearly_then_decays_by_cosine() {
        let s = schedules();
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr(5) - 5.5e-4).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        // Half-way through the decay the cosine is at its midpoint.
        assert!((s.lr(60) - (1e-6 + (1e-3 - 1e-6) * 0.5)).abs() < 1e-12);
        assert!((s.lr(110) - 1e-6).abs() < 1e-12);
    }

    #[test]
    fn weight_decay_rises_and_momentum_is_linear() {
        let s = schedules();
        assert!((s.weight_decay(0) - 0.04).abs() < 1e-12);
        assert!((s.weight_decay(55) - 0.22).abs() < 1e-12);
        assert!((s.weight_decay(110) - 0.4).abs() < 1e-12);
        assert!((s.momentum(0) - 0.996).abs() < 1e-12);
        assert!((s.momentum(55) - 0.998).abs() < 1e-12);
        assert!((s.momentum(110) - 1.0).abs() < 1e-12);
    }
}
