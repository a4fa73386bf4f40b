//! Image transforms of the input pipeline: random-resized-crop for
//! training, a centred square resize for evaluation, channel conversion and
//! normalisation. Plain Rust on 8-bit images so loader threads never touch
//! libtorch.

use rand::Rng;

use super::Image;

/// Aspect-ratio range of random-resized-crop, as in torchvision (3/4, 4/3).
const CROP_RATIO: [f64; 2] = [3.0 / 4.0, 4.0 / 3.0];

/// A crop window inside an image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// Draws a random-resized-crop window: area share in `scale`, aspect ratio
/// log-uniform in (3/4, 4/3), ten tries, then a centred crop with the ratio
/// clamped (torchvision's procedure).
pub fn crop_window(height: usize, width: usize, scale: [f64; 2], rng: &mut impl Rng) -> Window {
    let area = (height * width) as f64;
    let (log_lo, log_hi) = (CROP_RATIO[0].ln(), CROP_RATIO[1].ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(scale[0]..=scale[1]);
        let ratio = rng.gen_range(log_lo..=log_hi).exp();
        let w = (target * ratio).sqrt().round() as usize;
        let h = (target / ratio).sqrt().round() as usize;
        if w > 0 && h > 0 && w <= width && h <= height {
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return Window { top, left, height: h, width: w };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < CROP_RATIO[0] {
        ((width as f64 / CROP_RATIO[0]).round() as usize, width)
    } else if in_ratio > CROP_RATIO[1] {
        (height, (height as f64 * CROP_RATIO[1]).round() as usize)
    } else {
        (height, width)
    };
    let (h, w) = (h.clamp(1, height), w.clamp(1, width));
    Window { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

/// The largest centred square of an image.
pub fn center_square(height: usize, width: usize) -> Window {
    let side = height.min(width);
    Window { top: (height - side) / 2, left: (width - side) / 2, height: side, width: side }
}

/// Resizes `window` of `image` to `size x size` with bilinear interpolation
/// (half-pixel centres, as `align_corners = false`), writing normalised
/// floats in CHW order to `out`, which must hold `channels * size * size`.
///
/// `mean` and `std` are per output channel; the image's channels are
/// converted to `channels` first (grey is replicated, RGB becomes luma).
pub fn resize_normalise(
    image: &Image,
    window: Window,
    size: usize,
    channels: usize,
    mean: &[f32],
    std: &[f32],
    out: &mut [f32],
) {
    debug_assert_eq!(out.len(), channels * size * size);
    let sy = window.height as f32 / size as f32;
    let sx = window.width as f32 / size as f32;
    let mut pixel = [0f32; 3];
    for oy in 0..size {
        let (y0, y1, fy) = sample_coord(oy, sy, window.top, window.height);
        for ox in 0..size {
            let (x0, x1, fx) = sample_coord(ox, sx, window.left, window.width);
            for (c, value) in pixel.iter_mut().enumerate().take(image.channels) {
                let p = |y: usize, x: usize| f32::from(image.at(y, x, c));
                let top = p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx;
                let bottom = p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx;
                *value = (top * (1.0 - fy) + bottom * fy) / 255.0;
            }
            for c in 0..channels {
                let v = convert_channel(&pixel, image.channels, channels, c);
                out[(c * size + oy) * size + ox] = (v - mean[c]) / std[c];
            }
        }
    }
}

/// Source coordinates for output index `o`: two neighbours and the weight
/// of the second.
fn sample_coord(o: usize, scale: f32, start: usize, extent: usize) -> (usize, usize, f32) {
    let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(extent - 1);
    let i1 = (i0 + 1).min(extent - 1);
    (start + i0, start + i1, src - i0 as f32)
}

fn convert_channel(pixel: &[f32; 3], from: usize, to: usize, c: usize) -> f32 {
    match (from, to) {
        (1, _) => pixel[0],
        (3, 1) => 0.299 * pixel[0] + 0.587 * pixel[1] + 0.114 * pixel[2],
        _ => pixel[c],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ramp(h: usize, w: usize) -> Image {
        let data = (0..h * w).map(|i| (i % w * 10) as u8).collect();
        Image { channels: 1, height: h, width: w, data }
    }

    #[test]
    fn crop_windows_stay_inside_and_respect_the_scale() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..500 {
            let w = crop_window(28, 28, [0.3, 1.0], &mut rng);
            assert!(w.top + w.height <= 28 && w.left + w.width <= 28, "{w:?}");
            let share = (w.height * w.width) as f64 / 784.0;
            // Rounding of the sides moves the area a little off the range.
            assert!((0.25..=1.0).contains(&share), "{share}");
        }
    }

    #[test]
    fn identity_resize_keeps_pixels() {
        let image = ramp(4, 4);
        let mut out = vec![0.0; 16];
        resize_normalise(&image, center_square(4, 4), 4, 1, &[0.0], &[1.0], &mut out);
        let expected: Vec<f32> = image.data.iter().map(|&v| f32::from(v) / 255.0).collect();
        for (a, b) in out.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn downscale_by_two_averages_neighbours() {
        // Columns hold 0, 10, 20, 30; halving the width averages pairs.
        let image = ramp(4, 4);
        let mut out = vec![0.0; 4];
        resize_normalise(&image, center_square(4, 4), 2, 1, &[0.0], &[1.0], &mut out);
        assert!((out[0] * 255.0 - 5.0).abs() < 1e-4, "{}", out[0] * 255.0);
        assert!((out[1] * 255.0 - 25.0).abs() < 1e-4, "{}", out[1] * 255.0);
    }

    #[test]
    fn grey_is_replicated_and_normalised_per_channel() {
        let image = Image { channels: 1, height: 1, width: 1, data: vec![255] };
        let mut out = vec![0.0; 3];
        resize_normalise(
            &image,
            center_square(1, 1),
            1,
            3,
            &[0.0, 0.5, 1.0],
            &[1.0, 0.5, 2.0],
            &mut out,
        );
        assert_eq!(out, vec![1.0, 1.0, 0.0]);
    }
}
