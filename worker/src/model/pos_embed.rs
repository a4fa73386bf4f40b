//! The fixed 2-D sin-cos position table `P` shared by the encoders (width
//! D), the conditioning tokens, and the predictor (its own table at width
//! Dp), as METHOD.md section 4 defines it.

use tch::{Device, Kind, Tensor};

/// Returns the table as `[h * w][dim]` values in raster order of the grid
/// (`j = row * w + col`).
///
/// Channels `0..dim/2` encode the column index, channels `dim/2..dim` the
/// row index; each half is `[sin(p w_k), cos(p w_k)]` for
/// `w_k = 1 / 10000^(k / (dim/4))`, `k = 0..dim/4`. Computed in f64 and
/// rounded once to f32, like the public code's numpy table.
pub fn sincos_2d(dim: usize, grid_h: usize, grid_w: usize) -> Vec<f32> {
    assert!(dim % 4 == 0, "sin-cos width {dim} must be a multiple of 4");
    let quarter = dim / 4;
    let omega: Vec<f64> =
        (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let mut table = vec![0f32; grid_h * grid_w * dim];
    for row in 0..grid_h {
        for col in 0..grid_w {
            let out = &mut table[(row * grid_w + col) * dim..][..dim];
            for (half, pos) in [(0, col as f64), (1, row as f64)] {
                let base = half * 2 * quarter;
                for (k, w) in omega.iter().enumerate() {
                    out[base + k] = (pos * w).sin() as f32;
                    out[base + quarter + k] = (pos * w).cos() as f32;
                }
            }
        }
    }
    table
}

/// Returns the table as a `[1, h * w, dim]` f32 tensor on `device`.
pub fn sincos_tensor(dim: i64, grid_h: i64, grid_w: i64, device: Device) -> Tensor {
    let values = sincos_2d(dim as usize, grid_h as usize, grid_w as usize);
    Tensor::from_slice(&values)
        .view([1, grid_h * grid_w, dim])
        .to_device(device)
        .to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_follows_the_formula() {
        let (dim, h, w) = (16, 3, 5);
        let table = sincos_2d(dim, h, w);
        let quarter = dim / 4;
        for row in 0..h {
            for col in 0..w {
                let v = &table[(row * w + col) * dim..][..dim];
                for k in 0..quarter {
                    let omega = 1.0 / 10000f64.powf(k as f64 / 4.0);
                    let (c, r) = (col as f64 * omega, row as f64 * omega);
                    assert!((f64::from(v[k]) - c.sin()).abs() < 1e-7);
                    assert!((f64::from(v[quarter + k]) - c.cos()).abs() < 1e-7);
                    assert!((f64::from(v[2 * quarter + k]) - r.sin()).abs() < 1e-7);
                    assert!((f64::from(v[3 * quarter + k]) - r.cos()).abs() < 1e-7);
                }
            }
        }
        // Position (row 0, col 0): sines 0, cosines 1.
        assert_eq!(
            &table[..dim],
            &[0., 0., 0., 0., 1., 1., 1., 1., 0., 0., 0., 0., 1., 1., 1., 1.]
        );
        // Column 1 moves only the first half; the lowest frequency is 1 rad.
        let col1 = &table[dim..2 * dim];
        assert!((col1[0] - 1f32.sin()).abs() < 1e-7 && col1[8] == 0.0);
    }

    #[test]
    fn tensor_has_the_table_layout() {
        let t = sincos_tensor(8, 2, 2, Device::Cpu);
        assert_eq!(t.size(), [1, 4, 8]);
        // Grid position 2 is row 1, col 0: the row half holds sin(1), cos(1).
        let v = t.double_value(&[0, 2, 4]);
        assert!((v - 1f64.sin()).abs() < 1e-7, "{v}");
        assert_eq!(t.double_value(&[0, 2, 0]), 0.0);
    }
}
