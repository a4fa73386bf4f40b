//! Multi-block masks: which patches the context encoder sees and which
//! target blocks the predictor must fill in (METHOD.md section 3).
//!
//! The data loader calls [`MaskSampler::sample`] once per batch; the
//! resulting [`MaskBatch`] goes with the images to the model
//! (`crate::model::EcIjepa::loss`). This module is plain Rust, without
//! libtorch, so it can run on loader threads.
//!
//! Two modes exist. [`MaskMode::Faithful`] reproduces the sampler of the
//! public I-JEPA code, faults included: one uniform draw sets both scale
//! and aspect of the target blocks, positions use an exclusive upper bound
//! (no block touches the last row or column). [`MaskMode::Fixed`] draws
//! scale and aspect independently and lets blocks reach the grid's edge.
//! Both modes draw block sizes from a generator seeded by the step alone,
//! so data-parallel ranks agree on them, and both reject up front any
//! setting under which a block could hold `min_keep` patches or fewer,
//! where the public code would loop forever.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Failed placements of one block before one more target is allowed to
/// overlap the context block (the public code's timeout).
const TRIES_PER_RELAXATION: usize = 20;

/// Steps of the scale and aspect grids that validation walks to find the
/// smallest block a setting can produce.
const VALIDATION_STEPS: usize = 2000;

/// Errors of mask configuration and sampling.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// A configuration field holds an impossible value.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted name of the field, e.g. `mask.target_scale`.
        field: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// A block could not be placed even with every constraint relaxed.
    #[error("no {what} block of {height} x {width} holds more than min_keep {min_keep} patches")]
    Exhausted {
        /// `target` or `context`.
        what: &'static str,
        /// Block height in patches.
        height: usize,
        /// Block width in patches.
        width: usize,
        /// The configured minimum.
        min_keep: usize,
    },
    /// Index lists handed to [`MaskBatch::new`] are inconsistent.
    #[error("invalid mask batch: {0}")]
    Batch(String),
}

impl MaskError {
    /// Returns the field name of [`MaskError::Invalid`].
    pub fn field(&self) -> Option<&'static str> {
        match self {
            MaskError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> MaskError {
    MaskError::Invalid { field, message: message.into() }
}

/// Which sampler variant runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MaskMode {
    /// Reproduces `src/masks/multiblock.py` of the public I-JEPA code.
    #[default]
    Faithful,
    /// Inclusive position bound and independent scale and aspect draws.
    Fixed,
}

/// Settings of the multi-block sampler; field names follow the run spec.
// Limitation: every image gets exactly one context block (the public
// code's `nenc = 1`, used by all I-JEPA configurations); several context
// blocks per image cannot be configured.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskConfig {
    /// Sampler variant.
    pub mode: MaskMode,
    /// Rows of the patch grid.
    pub grid_h: usize,
    /// Columns of the patch grid.
    pub grid_w: usize,
    /// Target blocks per image, M.
    pub num_targets: usize,
    /// Share of the grid one target block covers, `[low, high]`.
    pub target_scale: [f64; 2],
    /// Height/width ratio of a target block, `[low, high]`.
    pub target_aspect: [f64; 2],
    /// Share of the grid the context block covers, `[low, high]`.
    pub context_scale: [f64; 2],
    /// Height/width ratio of the context block, `[low, high]`.
    pub context_aspect: [f64; 2],
    /// A block is accepted only when it holds more than this many patches.
    pub min_keep: usize,
}

impl MaskConfig {
    /// Returns the I-JEPA defaults on a `grid_h` x `grid_w` grid: 4 targets
    /// of scale (0.15, 0.2) and aspect (0.75, 1.5), one context block of
    /// scale (0.85, 1.0) and aspect 1, `min_keep` 10, faithful mode.
    pub fn ijepa(grid_h: usize, grid_w: usize) -> Self {
        MaskConfig {
            mode: MaskMode::Faithful,
            grid_h,
            grid_w,
            num_targets: 4,
            target_scale: [0.15, 0.2],
            target_aspect: [0.75, 1.5],
            context_scale: [0.85, 1.0],
            context_aspect: [1.0, 1.0],
            min_keep: 10,
        }
    }

    /// Checks every field, naming the first one that is wrong.
    ///
    /// # Errors
    ///
    /// [`MaskError::Invalid`] for ranges outside their domain, inverted
    /// ranges, a grid below 2 x 2, or a block that could hold `min_keep`
    /// patches or fewer (the public sampler would loop forever on it).
    pub fn validate(&self) -> Result<(), MaskError> {
        if self.grid_h < 2 || self.grid_w < 2 {
            let (h, w) = (self.grid_h, self.grid_w);
            return Err(invalid("mask.grid", format!("is {h} x {w}; both sides must be >= 2")));
        }
        if !(1..=64).contains(&self.num_targets) {
            let n = self.num_targets;
            return Err(invalid("mask.num_targets", format!("is {n}; allowed: 1 to 64")));
        }
        unit_range("mask.target_scale", self.target_scale)?;
        unit_range("mask.context_scale", self.context_scale)?;
        positive_range("mask.target_aspect", self.target_aspect)?;
        positive_range("mask.context_aspect", self.context_aspect)?;
        let patches = self.grid_h * self.grid_w;
        if self.min_keep >= patches {
            let k = self.min_keep;
            return Err(invalid("mask.min_keep", format!("is {k}; must be below {patches}")));
        }
        self.check_smallest_block("target", self.target_scale, self.target_aspect)?;
        self.check_smallest_block("context", self.context_scale, self.context_aspect)
    }

    /// Fails when some draw of the given ranges yields a block of at most
    /// `min_keep` patches.
    fn check_smallest_block(
        &self,
        what: &str,
        scale: [f64; 2],
        aspect: [f64; 2],
    ) -> Result<(), MaskError> {
        let smallest = self.smallest_block(scale, aspect);
        if smallest.height * smallest.width > self.min_keep {
            return Ok(());
        }
        Err(invalid(
            "mask.min_keep",
            format!(
                "is {} but a {what} block can be as small as {} x {} = {} patches on the \
                 {} x {} grid, and a block must hold more than min_keep; lower mask.min_keep \
                 or raise mask.{what}_scale",
                self.min_keep,
                smallest.height,
                smallest.width,
                smallest.height * smallest.width,
                self.grid_h,
                self.grid_w
            ),
        ))
    }

    /// Walks the draws of this mode on a fine grid and returns the block
    /// with the fewest patches.
    // Limitation: the walk samples draws on a grid, so a block size reached
    // only by draws strictly between two grid points escapes validation;
    // such a block then fails at sampling time with `Exhausted`, never a
    // hang.
    fn smallest_block(&self, scale: [f64; 2], aspect: [f64; 2]) -> BlockShape {
        let steps = VALIDATION_STEPS;
        let at = |i: usize| i as f64 / steps as f64;
        let mut best: Option<BlockShape> = None;
        let mut consider = |r_scale: f64, r_aspect: f64| {
            let shape = self.shape_from_draws(scale, aspect, r_scale, r_aspect);
            if best.is_none_or(|b| shape.height * shape.width < b.height * b.width) {
                best = Some(shape);
            }
        };
        match self.mode {
            MaskMode::Faithful => (0..=steps).for_each(|i| consider(at(i), at(i))),
            // Independent draws: a coarser square grid keeps validation fast.
            MaskMode::Fixed => {
                let coarse = steps / 10;
                for i in 0..=coarse {
                    for j in 0..=coarse {
                        consider(i as f64 / coarse as f64, j as f64 / coarse as f64);
                    }
                }
            }
        }
        best.expect("the walk visits at least one draw")
    }

    /// Turns uniform draws in [0, 1) into a block shape, as the public code
    /// does: `keep = floor(N * scale)`, sides `round(sqrt(keep * a))` and
    /// `round(sqrt(keep / a))` (Python rounds half to even), then shrunk to
    /// fit the grid.
    fn shape_from_draws(
        &self,
        scale: [f64; 2],
        aspect: [f64; 2],
        r_scale: f64,
        r_aspect: f64,
    ) -> BlockShape {
        let s = scale[0] + r_scale * (scale[1] - scale[0]);
        let a = aspect[0] + r_aspect * (aspect[1] - aspect[0]);
        let keep = ((self.grid_h * self.grid_w) as f64 * s).floor();
        let mut height = (keep * a).sqrt().round_ties_even() as usize;
        let mut width = (keep / a).sqrt().round_ties_even() as usize;
        match self.mode {
            // `while h >= height: h -= 1` in the public code.
            MaskMode::Faithful => {
                height = height.min(self.grid_h - 1);
                width = width.min(self.grid_w - 1);
            }
            MaskMode::Fixed => {
                height = height.clamp(1, self.grid_h);
                width = width.clamp(1, self.grid_w);
            }
        }
        BlockShape { height, width, scale: s, aspect: a }
    }
}

fn unit_range(field: &'static str, [low, high]: [f64; 2]) -> Result<(), MaskError> {
    if !(low > 0.0 && low <= 1.0 && high > 0.0 && high <= 1.0) {
        return Err(invalid(field, format!("is [{low}, {high}]; both ends must lie in (0, 1]")));
    }
    if low > high {
        return Err(invalid(
            field,
            format!("is [{low}, {high}]; the low end exceeds the high end"),
        ));
    }
    Ok(())
}

fn positive_range(field: &'static str, [low, high]: [f64; 2]) -> Result<(), MaskError> {
    if !(low > 0.0 && low.is_finite() && high > 0.0 && high.is_finite()) {
        return Err(invalid(
            field,
            format!("is [{low}, {high}]; both ends must be finite and > 0"),
        ));
    }
    if low > high {
        return Err(invalid(
            field,
            format!("is [{low}, {high}]; the low end exceeds the high end"),
        ));
    }
    Ok(())
}

/// Size of the blocks of one batch, with the draws that produced it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockShape {
    /// Rows of the block, in patches.
    pub height: usize,
    /// Columns of the block, in patches.
    pub width: usize,
    /// Drawn share of the grid.
    pub scale: f64,
    /// Drawn height/width ratio.
    pub aspect: f64,
}

/// The block sizes of one batch: every image of the batch, on every rank,
/// uses them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockSizes {
    /// Size of each target block.
    pub target: BlockShape,
    /// Size of the context block, before targets are cut out of it.
    pub context: BlockShape,
}

/// An axis-aligned block on the grid.
#[derive(Clone, Copy, Debug)]
struct Rect {
    top: usize,
    left: usize,
    height: usize,
    width: usize,
}

impl Rect {
    fn contains(&self, row: usize, col: usize) -> bool {
        (self.top..self.top + self.height).contains(&row)
            && (self.left..self.left + self.width).contains(&col)
    }
}

/// The index lists of one batch, in raster order (`row * grid_w + col`).
///
/// Every list of a kind has the same length: the sampler cuts each to the
/// shortest of its batch, keeping the first entries, so they stack into
/// `[B, Nc]` and `[M][B, Nt]` tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskBatch {
    grid_h: usize,
    grid_w: usize,
    context: Vec<Vec<i64>>,
    targets: Vec<Vec<Vec<i64>>>,
}

impl MaskBatch {
    /// Builds a batch from explicit index lists: `context[b]` for image b,
    /// `targets[m][b]` for target block m of image b.
    ///
    /// # Errors
    ///
    /// [`MaskError::Batch`] when the batch is empty, lists of one kind differ
    /// in length, a list is empty, or an index lies outside the grid.
    pub fn new(
        grid_h: usize,
        grid_w: usize,
        context: Vec<Vec<i64>>,
        targets: Vec<Vec<Vec<i64>>>,
    ) -> Result<Self, MaskError> {
        let batch = context.len();
        if batch == 0 || targets.is_empty() {
            return Err(MaskError::Batch("needs at least one image and one target".into()));
        }
        let patches = (grid_h * grid_w) as i64;
        check_lists("context", &context, batch, patches)?;
        for (m, lists) in targets.iter().enumerate() {
            check_lists(&format!("target {m}"), lists, batch, patches)?;
        }
        let target_len = targets[0][0].len();
        if targets.iter().any(|lists| lists[0].len() != target_len) {
            return Err(MaskError::Batch("target blocks differ in length".into()));
        }
        Ok(MaskBatch { grid_h, grid_w, context, targets })
    }

    /// Returns the grid as (rows, columns).
    pub fn grid(&self) -> (usize, usize) {
        (self.grid_h, self.grid_w)
    }

    /// Returns the number of images, B.
    pub fn batch_size(&self) -> usize {
        self.context.len()
    }

    /// Returns the number of target blocks per image, M.
    pub fn num_targets(&self) -> usize {
        self.targets.len()
    }

    /// Returns the context indices of every image, `[B][Nc]`.
    pub fn context(&self) -> &[Vec<i64>] {
        &self.context
    }

    /// Returns the target indices, `[M][B][Nt]`.
    pub fn targets(&self) -> &[Vec<Vec<i64>>] {
        &self.targets
    }

    /// Returns the context length Nc shared by every image.
    pub fn context_len(&self) -> usize {
        self.context[0].len()
    }

    /// Returns the target length Nt shared by every block.
    pub fn target_len(&self) -> usize {
        self.targets[0][0].len()
    }

    /// Returns the sorted, de-duplicated union of image `b`'s target blocks.
    pub fn target_union(&self, b: usize) -> Vec<i64> {
        let mut union: Vec<i64> = self.targets.iter().flat_map(|m| m[b].iter().copied()).collect();
        union.sort_unstable();
        union.dedup();
        union
    }
}

fn check_lists(
    what: &str,
    lists: &[Vec<i64>],
    batch: usize,
    patches: i64,
) -> Result<(), MaskError> {
    if lists.len() != batch {
        return Err(MaskError::Batch(format!(
            "{what} has {} lists for {batch} images",
            lists.len()
        )));
    }
    let len = lists[0].len();
    if len == 0 || lists.iter().any(|l| l.len() != len) {
        return Err(MaskError::Batch(format!("{what} lists are empty or differ in length")));
    }
    if lists.iter().flatten().any(|&i| !(0..patches).contains(&i)) {
        return Err(MaskError::Batch(format!("{what} holds an index outside 0..{patches}")));
    }
    Ok(())
}

/// Draws multi-block masks for whole batches.
#[derive(Clone, Debug)]
pub struct MaskSampler {
    config: MaskConfig,
}

impl MaskSampler {
    /// Validates the configuration and returns a sampler for it.
    ///
    /// # Errors
    ///
    /// The first invalid field, as [`MaskConfig::validate`] reports it.
    pub fn new(config: MaskConfig) -> Result<Self, MaskError> {
        config.validate()?;
        Ok(MaskSampler { config })
    }

    /// Returns the configuration.
    pub fn config(&self) -> &MaskConfig {
        &self.config
    }

    /// Returns the block sizes of the batch at `step`. They depend on the
    /// step alone, so every rank draws the same ones.
    pub fn block_sizes(&self, step: u64) -> BlockSizes {
        let c = &self.config;
        let mut generator = ChaCha8Rng::seed_from_u64(step);
        let target = match c.mode {
            MaskMode::Faithful => {
                let r: f64 = generator.gen();
                c.shape_from_draws(c.target_scale, c.target_aspect, r, r)
            }
            MaskMode::Fixed => {
                let (r_scale, r_aspect): (f64, f64) = (generator.gen(), generator.gen());
                c.shape_from_draws(c.target_scale, c.target_aspect, r_scale, r_aspect)
            }
        };
        let context = match c.mode {
            MaskMode::Faithful => {
                let r: f64 = generator.gen();
                c.shape_from_draws(c.context_scale, c.context_aspect, r, r)
            }
            MaskMode::Fixed => {
                let (r_scale, r_aspect): (f64, f64) = (generator.gen(), generator.gen());
                c.shape_from_draws(c.context_scale, c.context_aspect, r_scale, r_aspect)
            }
        };
        BlockSizes { target, context }
    }

    /// Draws the masks of one batch of `batch` images. Block sizes come from
    /// `step`; positions come from `rng`, which each rank seeds on its own.
    ///
    /// # Errors
    ///
    /// [`MaskError::Batch`] for an empty batch, and [`MaskError::Exhausted`]
    /// if a block cannot exceed `min_keep` even with every constraint
    /// relaxed (validation rules that out for every configuration it
    /// accepts).
    pub fn sample<R: Rng>(
        &self,
        step: u64,
        batch: usize,
        rng: &mut R,
    ) -> Result<MaskBatch, MaskError> {
        if batch == 0 {
            return Err(MaskError::Batch("batch size is 0".into()));
        }
        let sizes = self.block_sizes(step);
        let items = (0..batch)
            .map(|_| self.sample_item(sizes, rng))
            .collect::<Result<Vec<_>, MaskError>>()?;
        self.collate(items)
    }

    /// Like [`MaskSampler::sample`], with one generator per image: an
    /// image's blocks depend only on the step and its own generator, so
    /// data-parallel ranks that seed each image by its position in the
    /// global batch draw what one rank with the whole batch would.
    ///
    /// # Errors
    ///
    /// As [`MaskSampler::sample`].
    pub fn sample_each<R: Rng>(&self, step: u64, rngs: &mut [R]) -> Result<MaskBatch, MaskError> {
        if rngs.is_empty() {
            return Err(MaskError::Batch("batch size is 0".into()));
        }
        let sizes = self.block_sizes(step);
        let items = rngs
            .iter_mut()
            .map(|rng| self.sample_item(sizes, rng))
            .collect::<Result<Vec<_>, MaskError>>()?;
        self.collate(items)
    }

    /// The target lists and the context list of one image.
    fn sample_item<R: Rng>(
        &self,
        sizes: BlockSizes,
        rng: &mut R,
    ) -> Result<(Vec<Vec<i64>>, Vec<i64>), MaskError> {
        let m = self.config.num_targets;
        let mut rects = Vec::with_capacity(m);
        let mut targets = Vec::with_capacity(m);
        for _ in 0..m {
            let (indices, rect) = self.place("target", sizes.target, &[], rng)?;
            targets.push(indices);
            rects.push(rect);
        }
        let (context, _) = self.place("context", sizes.context, &rects, rng)?;
        Ok((targets, context))
    }

    /// Gathers per-image lists into a batch, cutting every list to the
    /// shortest of its kind.
    fn collate(&self, items: Vec<(Vec<Vec<i64>>, Vec<i64>)>) -> Result<MaskBatch, MaskError> {
        let m = self.config.num_targets;
        let mut targets: Vec<Vec<Vec<i64>>> = vec![Vec::with_capacity(items.len()); m];
        let mut context = Vec::with_capacity(items.len());
        for (item_targets, item_context) in items {
            for (lists, indices) in targets.iter_mut().zip(item_targets) {
                lists.push(indices);
            }
            context.push(item_context);
        }

        // Collation: every list is cut to the shortest of its kind.
        let target_len = targets.iter().flatten().map(Vec::len).min().unwrap_or(0);
        targets.iter_mut().flatten().for_each(|l| l.truncate(target_len));
        let context_len = context.iter().map(Vec::len).min().unwrap_or(0);
        context.iter_mut().for_each(|l| l.truncate(context_len));
        MaskBatch::new(self.config.grid_h, self.config.grid_w, context, targets)
    }

    /// Places one block, minus the `excluded` rectangles, until it holds
    /// more than `min_keep` patches. After every 20 failures the last still
    /// excluded rectangle is allowed back, as in the public code.
    fn place<R: Rng>(
        &self,
        what: &'static str,
        shape: BlockShape,
        excluded: &[Rect],
        rng: &mut R,
    ) -> Result<(Vec<i64>, Rect), MaskError> {
        let c = &self.config;
        let (height, width) = (shape.height, shape.width);
        let exhausted = MaskError::Exhausted { what, height, width, min_keep: c.min_keep };
        if height * width <= c.min_keep {
            return Err(exhausted);
        }
        for attempt in 0.. {
            let relaxed = attempt / TRIES_PER_RELAXATION;
            if relaxed > excluded.len() {
                return Err(exhausted);
            }
            let active = &excluded[..excluded.len() - relaxed];
            let rect = self.random_rect(height, width, rng);
            let indices = self.indices(&rect, active);
            if indices.len() > c.min_keep {
                return Ok((indices, rect));
            }
        }
        unreachable!("the attempt loop returns once every exclusion is relaxed")
    }

    /// Draws the top-left corner: exclusive upper bound in faithful mode
    /// (`randint(0, h - bh)`), inclusive in fixed mode.
    fn random_rect<R: Rng>(&self, height: usize, width: usize, rng: &mut R) -> Rect {
        let c = &self.config;
        let (top, left) = match c.mode {
            MaskMode::Faithful => {
                (rng.gen_range(0..c.grid_h - height), rng.gen_range(0..c.grid_w - width))
            }
            MaskMode::Fixed => {
                (rng.gen_range(0..=c.grid_h - height), rng.gen_range(0..=c.grid_w - width))
            }
        };
        Rect { top, left, height, width }
    }

    /// Returns the raster-order indices of `rect` outside every `excluded`.
    fn indices(&self, rect: &Rect, excluded: &[Rect]) -> Vec<i64> {
        let mut out = Vec::with_capacity(rect.height * rect.width);
        for row in rect.top..rect.top + rect.height {
            for col in rect.left..rect.left + rect.width {
                if !excluded.iter().any(|e| e.contains(row, col)) {
                    out.push((row * self.config.grid_w + col) as i64);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(config: MaskConfig) -> MaskSampler {
        MaskSampler::new(config).unwrap()
    }

    #[test]
    fn faithful_statistics_match_the_public_sampler_on_14x14() {
        let s = sampler(MaskConfig::ijepa(14, 14));
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut target_sum, mut context_sum, mut batches) = (0.0, 0.0, 0.0);
        let (mut target_min, mut target_max) = (usize::MAX, 0);
        for step in 0..60 {
            let masks = s.sample(step, 128, &mut rng).unwrap();
            let nt = masks.target_len();
            (target_min, target_max) = (target_min.min(nt), target_max.max(nt));
            target_sum += nt as f64;
            context_sum += masks.context_len() as f64;
            batches += 1.0;
            // Exclusive bound: nothing in the last row (index >= 13 * 14) or
            // the last column (index % 14 == 13).
            let all = masks.context().iter().chain(masks.targets().iter().flatten());
            for &i in all.flatten() {
                assert!(i < 13 * 14 && i % 14 != 13, "index {i} touches the last row/column");
            }
        }
        assert!(target_min >= 30 && target_max <= 40, "targets {target_min}..{target_max}");
        let (target_mean, context_mean) = (target_sum / batches, context_sum / batches);
        assert!((32.0..=35.0).contains(&target_mean), "target mean {target_mean}");
        assert!((46.0..=56.0).contains(&context_mean), "context mean {context_mean}");
    }

    #[test]
    fn faithful_block_sizes_share_one_draw_and_depend_on_the_step_only() {
        let s = sampler(MaskConfig::ijepa(14, 14));
        assert_eq!(s.block_sizes(5), s.block_sizes(5));
        let mut sizes: Vec<(f64, f64)> = (0..200)
            .map(|step| {
                let t = s.block_sizes(step).target;
                (t.scale, t.aspect)
            })
            .collect();
        // One draw sets both: sorting by scale sorts aspect too.
        sizes.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(sizes.windows(2).all(|w| w[0].1 <= w[1].1));
        // The context block of the defaults is 13 x 13 at the origin.
        let ctx = s.block_sizes(3).context;
        assert_eq!((ctx.height, ctx.width), (13, 13));
    }

    #[test]
    fn fixed_mode_reaches_the_edge_and_draws_independently() {
        let config = MaskConfig { mode: MaskMode::Fixed, ..MaskConfig::ijepa(14, 14) };
        let s = sampler(config);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (mut last_row, mut last_col) = (false, false);
        for step in 0..20 {
            let masks = s.sample(step, 64, &mut rng).unwrap();
            for &i in masks.targets().iter().flatten().flatten() {
                last_row |= i >= 13 * 14;
                last_col |= i % 14 == 13;
            }
        }
        assert!(last_row && last_col, "fixed mode never touched the last row/column");

        let draws: Vec<(f64, f64)> = (0..2000)
            .map(|step| {
                let t = s.block_sizes(step).target;
                (t.scale, t.aspect)
            })
            .collect();
        let corr = correlation(&draws);
        assert!(corr.abs() < 0.1, "scale and aspect correlate: {corr}");
        // The full-grid context block fits with an inclusive bound.
        let ctx = MaskConfig {
            mode: MaskMode::Fixed,
            context_scale: [1.0, 1.0],
            ..MaskConfig::ijepa(14, 14)
        };
        assert_eq!(sampler(ctx).block_sizes(0).context.height, 14);
    }

    fn correlation(pairs: &[(f64, f64)]) -> f64 {
        let n = pairs.len() as f64;
        let (mx, my) = pairs.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
        let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
        for (x, y) in pairs {
            sxy += (x - mx) * (y - my);
            sxx += (x - mx) * (x - mx);
            syy += (y - my) * (y - my);
        }
        sxy / (sxx * syy).sqrt()
    }

    #[test]
    fn context_excludes_targets_and_lists_are_sorted_and_collated() {
        for mode in [MaskMode::Faithful, MaskMode::Fixed] {
            let config = MaskConfig { mode, min_keep: 4, ..MaskConfig::ijepa(8, 8) };
            let s = sampler(config);
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let masks = s.sample(9, 16, &mut rng).unwrap();
            assert_eq!(masks.batch_size(), 16);
            assert_eq!(masks.num_targets(), 4);
            for b in 0..16 {
                let ctx = &masks.context()[b];
                assert_eq!(ctx.len(), masks.context_len());
                assert!(ctx.windows(2).all(|w| w[0] < w[1]), "context not in raster order");
                assert!(ctx.len() > 4);
                for lists in masks.targets() {
                    assert!(lists[b].windows(2).all(|w| w[0] < w[1]));
                    assert_eq!(lists[b].len(), masks.target_len());
                }
            }
        }
    }

    #[test]
    fn overlap_is_allowed_back_when_targets_cover_the_context() {
        // Every block is 7 x 7 at the origin (the exclusive bound leaves one
        // position on 8 x 8), so the context is empty until every target is
        // relaxed, and then it is the whole 7 x 7 block.
        let config = MaskConfig {
            target_scale: [0.77, 0.77],
            target_aspect: [1.0, 1.0],
            context_scale: [0.77, 0.77],
            min_keep: 3,
            ..MaskConfig::ijepa(8, 8)
        };
        let s = sampler(config);
        let masks = s.sample(0, 8, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        assert_eq!(masks.target_len(), 49);
        assert_eq!(masks.context_len(), 49);
    }

    #[test]
    fn validation_names_the_offending_field() {
        let base = MaskConfig::ijepa(14, 14);
        let cases: Vec<(&str, MaskConfig)> = vec![
            ("mask.target_scale", MaskConfig { target_scale: [0.0, 0.2], ..base.clone() }),
            ("mask.target_scale", MaskConfig { target_scale: [0.2, 0.15], ..base.clone() }),
            ("mask.context_scale", MaskConfig { context_scale: [0.85, 1.2], ..base.clone() }),
            ("mask.target_aspect", MaskConfig { target_aspect: [0.0, 1.5], ..base.clone() }),
            ("mask.context_aspect", MaskConfig { context_aspect: [2.0, 1.0], ..base.clone() }),
            ("mask.num_targets", MaskConfig { num_targets: 0, ..base.clone() }),
            ("mask.grid", MaskConfig::ijepa(1, 14)),
            ("mask.min_keep", MaskConfig { min_keep: 196, ..base.clone() }),
            // 7 x 7 with I-JEPA's min_keep 10: a target holds 6 to 9 patches.
            ("mask.min_keep", MaskConfig::ijepa(7, 7)),
            ("mask.min_keep", MaskConfig { mode: MaskMode::Fixed, ..MaskConfig::ijepa(7, 7) }),
        ];
        for (field, config) in cases {
            let err = MaskSampler::new(config).unwrap_err();
            assert_eq!(err.field(), Some(field), "{err}");
            assert!(err.to_string().starts_with(field), "{err}");
        }
        let small = MaskConfig { min_keep: 4, ..MaskConfig::ijepa(7, 7) };
        assert!(MaskSampler::new(small).is_ok());
    }

    #[test]
    fn impossible_block_fails_instead_of_looping() {
        // Bypass validation to reach the runtime guard directly.
        let config = MaskConfig { min_keep: 40, ..MaskConfig::ijepa(14, 14) };
        let s = MaskSampler { config };
        let err = s.sample(0, 2, &mut ChaCha8Rng::seed_from_u64(0)).unwrap_err();
        assert!(matches!(err, MaskError::Exhausted { what: "target", .. }), "{err}");
    }

    #[test]
    fn explicit_batches_are_checked() {
        let ok = MaskBatch::new(2, 2, vec![vec![0, 1]], vec![vec![vec![3]]]).unwrap();
        assert_eq!(ok.target_union(0), vec![3]);
        assert!(MaskBatch::new(2, 2, vec![vec![0, 4]], vec![vec![vec![3]]]).is_err());
        assert!(MaskBatch::new(2, 2, vec![vec![0], vec![1, 2]], vec![vec![vec![3]]]).is_err());
        assert!(MaskBatch::new(2, 2, vec![], vec![]).is_err());
    }
}
