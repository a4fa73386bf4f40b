//! The training objective around the networks: target features, the
//! smooth-L1 loss and the EMA step of the target encoder (METHOD.md
//! sections 1 and 5). All three run in f32 whatever the forward precision.

use tch::{Kind, Reduction, Tensor};

/// Epsilon of the target layer norm: `F.layer_norm`'s default, which the
/// public I-JEPA code uses (the encoders' own norms use 1e-6).
pub const TARGET_NORM_EPS: f64 = 1e-5;

/// Normalises target-encoder output `[.., D]` over features, without
/// affine parameters, in f32.
pub fn target_layer_norm(h: &Tensor) -> Tensor {
    let d = *h.size().last().expect("features have a last dimension");
    h.to_kind(Kind::Float).layer_norm([d], None::<Tensor>, None::<Tensor>, TARGET_NORM_EPS, true)
}

/// Returns the smooth-L1 loss (beta 1, mean over all elements) between
/// predictions and targets, in f32.
pub fn smooth_l1(predictions: &Tensor, targets: &Tensor) -> Tensor {
    predictions.to_kind(Kind::Float).smooth_l1_loss(
        &targets.to_kind(Kind::Float),
        Reduction::Mean,
        1.0,
    )
}

/// Moves `target` towards `context` in place:
/// `target = momentum * target + (1 - momentum) * context`, without
/// gradient, in the public code's operation order.
pub fn ema_step(target: &mut Tensor, context: &Tensor, momentum: f64) {
    tch::no_grad(|| {
        let _ = target.g_mul_scalar_(momentum);
        let _ = target.g_add_(&(context.detach() * (1.0 - momentum)));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn ema_step_mixes_with_the_momentum() {
        let mut target = Tensor::from_slice(&[1.0f32, -2.0, 4.0]);
        let context = Tensor::from_slice(&[3.0f32, 2.0, 0.0]);
        ema_step(&mut target, &context, 0.75);
        let got: Vec<f32> = Vec::try_from(&target).unwrap();
        assert_eq!(got, [1.5, -1.0, 3.0]);
        // Momentum 1 freezes the target; momentum 0 copies the context.
        ema_step(&mut target, &context, 1.0);
        assert_eq!(Vec::<f32>::try_from(&target).unwrap(), [1.5, -1.0, 3.0]);
        ema_step(&mut target, &context, 0.0);
        assert_eq!(Vec::<f32>::try_from(&target).unwrap(), [3.0, 2.0, 0.0]);
    }

    #[test]
    fn target_norm_has_zero_mean_unit_variance_without_affine() {
        let h = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([1, 4]);
        let n = target_layer_norm(&h);
        let var = 1.25f64; // population variance of 1..4
        let want = (1.0 - 2.5) / (var + TARGET_NORM_EPS).sqrt();
        assert!((n.double_value(&[0, 0]) - want).abs() < 1e-6);
        assert!(n.sum(Kind::Float).double_value(&[]).abs() < 1e-6);
    }

    #[test]
    fn smooth_l1_is_quadratic_below_one_and_linear_above() {
        let p = Tensor::from_slice(&[0.5f32, 3.0]).to_device(Device::Cpu);
        let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        // (0.5 * 0.5^2 + (3 - 0.5)) / 2
        let got = smooth_l1(&p, &t).double_value(&[]);
        assert!((got - (0.125 + 2.5) / 2.0).abs() < 1e-7, "{got}");
    }
}
