//! EC conditioning tokens (METHOD.md section 2): which grid positions of
//! the other window become tokens, pooled or not, and how a batch of them
//! with different counts per image is fed to the encoders.
//!
//! A token stands for one pooling window (kernel k, stride s, no padding,
//! like `avg_pool2d`'s defaults) that holds at least one position of the
//! window's 0/1 grid mask; its position embedding is the mean of `P` over
//! those positions. With k = s = 1 that is one token per position, `P[j]`.
//! Positions that no window covers (when `(side - k) % s != 0` or `s > k`)
//! give no token.
//!
//! Batching: the token count differs between images (the union of target
//! blocks overlaps by chance, and pooling merges positions), so the tokens
//! are padded to the largest count of the batch and the padding is hidden
//! from attention with a key mask. Every image thus sees exactly its own
//! tokens, as if it were run alone; no conditioning information is cut.
//! When all counts agree (always for the target encoder at k = s = 1,
//! since collation equalises the context lists) no mask is built and the
//! fused attention kernels stay available.

use tch::{Device, Kind, Tensor};

/// Returns, for each pooling window that holds a position of `positions`,
/// the positions inside it, windows in raster order.
pub(crate) fn pool_windows(
    positions: &[i64],
    grid_h: i64,
    grid_w: i64,
    kernel: i64,
    stride: i64,
) -> Vec<Vec<i64>> {
    let mut on_grid = vec![false; (grid_h * grid_w) as usize];
    for &p in positions {
        on_grid[p as usize] = true;
    }
    let (rows, cols) = ((grid_h - kernel) / stride + 1, (grid_w - kernel) / stride + 1);
    let mut windows = Vec::new();
    for wr in 0..rows {
        for wc in 0..cols {
            let members: Vec<i64> = (wr * stride..wr * stride + kernel)
                .flat_map(|r| (wc * stride..wc * stride + kernel).map(move |c| r * grid_w + c))
                .filter(|&j| on_grid[j as usize])
                .collect();
            if !members.is_empty() {
                windows.push(members);
            }
        }
    }
    windows
}

/// Returns the number of conditioning tokens `positions` yield.
pub(crate) fn token_count(
    positions: &[i64],
    grid_h: i64,
    grid_w: i64,
    kernel: i64,
    stride: i64,
) -> usize {
    pool_windows(positions, grid_h, grid_w, kernel, stride).len()
}

/// The conditioning tokens of one batch, as averaging weights over the
/// position table, padded to the largest count K of the batch.
#[derive(Debug)]
pub(crate) struct CondTokens {
    /// Grid positions averaged by each token, `[B, K, k*k]` (padding 0).
    pub(crate) index: Tensor,
    /// Averaging weights, `[B, K, k*k]`: `1 / members`, padding 0.
    pub(crate) weight: Tensor,
    /// Which tokens are real, `[B, K]`; `None` when every image has K.
    pub(crate) valid: Option<Tensor>,
}

impl CondTokens {
    /// Builds the tokens of a batch from each image's positions.
    pub(crate) fn build(
        per_image: &[Vec<i64>],
        grid: (i64, i64),
        kernel: i64,
        stride: i64,
        device: Device,
    ) -> Self {
        let windows: Vec<Vec<Vec<i64>>> = per_image
            .iter()
            .map(|positions| pool_windows(positions, grid.0, grid.1, kernel, stride))
            .collect();
        let counts: Vec<usize> = windows.iter().map(Vec::len).collect();
        let (b, k, kk) =
            (per_image.len(), counts.iter().copied().max().unwrap_or(0), kernel * kernel);

        let mut index = vec![0i64; b * k * kk as usize];
        let mut weight = vec![0f32; b * k * kk as usize];
        for (i, image) in windows.iter().enumerate() {
            for (t, members) in image.iter().enumerate() {
                let offset = (i * k + t) * kk as usize;
                for (m, &pos) in members.iter().enumerate() {
                    index[offset + m] = pos;
                    weight[offset + m] = 1.0 / members.len() as f32;
                }
            }
        }

        let shape = [b as i64, k as i64, kk];
        let valid = counts.iter().any(|&c| c != k).then(|| {
            let flags: Vec<bool> =
                counts.iter().flat_map(|&c| (0..k).map(move |t| t < c)).collect();
            Tensor::from_slice(&flags).view([b as i64, k as i64]).to_device(device)
        });
        CondTokens {
            index: Tensor::from_slice(&index).view(shape).to_device(device),
            weight: Tensor::from_slice(&weight).view(shape).to_device(device),
            valid,
        }
    }

    /// Returns the tokens' position embeddings from a `[1, N, D]` table:
    /// `[B, K, D]`, zero for padding.
    pub(crate) fn positions(&self, table: &Tensor) -> Tensor {
        let (b, k, kk) = self.index.size3().expect("index is [B, K, k*k]");
        let d = table.size()[2];
        let gathered = table.get(0).index_select(0, &self.index.view([-1])); // [B*K*k*k, D]
        let gathered = gathered.view([b, k, kk, d]); // [B, K, k*k, D]
        (gathered * self.weight.unsqueeze(-1)).sum_dim_intlist(
            [2i64].as_slice(),
            false,
            Kind::Float,
        )
    }

    /// Returns the `[B, 1, 1, L]` key mask for a sequence of `patches`
    /// patch tokens followed by these tokens, or `None` without padding.
    // Limitation: with a mask, CUDA attention cannot use the flash kernel
    // and padded tokens are computed and thrown away, so ragged batches
    // cost more than their real token counts.
    pub(crate) fn attention_mask(&self, patches: i64) -> Option<Tensor> {
        let valid = self.valid.as_ref()?;
        let b = valid.size()[0];
        let patch_keys = Tensor::ones([b, patches], (Kind::Bool, valid.device()));
        let keys = Tensor::cat(&[patch_keys, valid.shallow_clone()], 1); // [B, L]
        Some(keys.view([b, 1, 1, -1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_token_per_position_without_pooling() {
        let positions = [0i64, 1, 2, 9, 63];
        assert_eq!(token_count(&positions, 8, 8, 1, 1), 5);
        assert_eq!(pool_windows(&positions, 8, 8, 1, 1)[3], vec![9]);
    }

    #[test]
    fn pooling_merges_positions_and_drops_empty_windows() {
        // A 2 x 3 block at rows 0-1, cols 1-3 of an 8 x 8 grid.
        let block = [1i64, 2, 3, 9, 10, 11];
        // k = s = 2: windows (0,0) holds 1, 9; window (0,1) holds 2, 3,
        // 10, 11; the other 14 windows are empty and dropped.
        let windows = pool_windows(&block, 8, 8, 2, 2);
        assert_eq!(windows, vec![vec![1, 9], vec![2, 3, 10, 11]]);
        // k = 3, s = 1: 6 x 6 windows; those with top row 0 or 1 and left
        // column 0..=3 touch the block: 2 * 4 = 8.
        assert_eq!(token_count(&block, 8, 8, 3, 1), 8);
        // k = 1, s = 2 samples even rows and columns only: of the six
        // positions only (row 0, col 2) remains.
        assert_eq!(pool_windows(&block, 8, 8, 1, 2), vec![vec![2]]);
        // The whole 8 x 8 grid at k = s = 2 gives all 16 windows.
        let all: Vec<i64> = (0..64).collect();
        assert_eq!(token_count(&all, 8, 8, 2, 2), 16);
    }

    #[test]
    fn batches_pad_to_the_largest_count_and_mask_the_padding() {
        let per_image = vec![vec![1i64, 2, 3, 9, 10, 11], vec![0, 1]];
        let tokens = CondTokens::build(&per_image, (8, 8), 2, 2, Device::Cpu);
        assert_eq!(tokens.index.size(), [2, 2, 4]);
        let mask = tokens.attention_mask(3).unwrap();
        assert_eq!(mask.size(), [2, 1, 1, 5]);
        let flags: Vec<bool> = Vec::try_from(mask.view([-1])).unwrap();
        assert_eq!(flags, [true, true, true, true, true, true, true, true, true, false]);

        // Means of the table over each window's positions: with a table
        // holding the position index, the second token of image 0 averages
        // 2, 3, 10, 11.
        let table = Tensor::arange(64, (Kind::Float, Device::Cpu)).view([1, 64, 1]);
        let pos = tokens.positions(&table);
        assert_eq!(pos.size(), [2, 2, 1]);
        assert_eq!(pos.double_value(&[0, 0, 0]), 5.0);
        assert_eq!(pos.double_value(&[0, 1, 0]), 6.5);
        assert_eq!(pos.double_value(&[1, 0, 0]), 0.5);
        assert_eq!(pos.double_value(&[1, 1, 0]), 0.0);

        let equal = CondTokens::build(&[vec![0, 1], vec![5, 7]], (8, 8), 1, 1, Device::Cpu);
        assert!(equal.valid.is_none() && equal.attention_mask(3).is_none());
    }
}
