//! Reader of the IDX format of MNIST and Fashion-MNIST, gzipped or not.
//!
//! An IDX file is a big-endian header (magic `0x0000_08NN`, where NN is the
//! number of dimensions, then one u32 per dimension) followed by u8 values.

use std::io::Read;
use std::path::Path;

use super::{DataError, Image, Split};

/// Images and labels of one IDX split, 8-bit grey.
#[derive(Clone, Debug)]
pub struct IdxSet {
    /// Pixels of all images, `[n, rows, cols]` flattened.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<i64>,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
}

impl IdxSet {
    /// Loads `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` from `dir`.
    ///
    /// # Errors
    ///
    /// Fails when a file is missing, malformed, or images and labels differ
    /// in count.
    pub fn load(dir: &Path, split: Split) -> Result<Self, DataError> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let images = read_idx(&find(dir, &format!("{prefix}-images-idx3-ubyte"))?)?;
        let labels = read_idx(&find(dir, &format!("{prefix}-labels-idx1-ubyte"))?)?;
        let [n, rows, cols] = images.dims[..] else {
            return Err(DataError::Format(format!("image file has dims {:?}", images.dims)));
        };
        if labels.dims != [n] {
            return Err(DataError::Format(format!(
                "{n} images but label dims {:?} in {}",
                labels.dims,
                dir.display()
            )));
        }
        let labels = labels.data.into_iter().map(i64::from).collect();
        Ok(IdxSet { pixels: images.data, labels, rows, cols })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Returns image `i` as a one-channel [`Image`].
    pub fn image(&self, i: usize) -> Image {
        let size = self.rows * self.cols;
        Image {
            channels: 1,
            height: self.rows,
            width: self.cols,
            data: self.pixels[i * size..(i + 1) * size].to_vec(),
        }
    }
}

/// Finds `stem.gz` or `stem` in `dir`.
fn find(dir: &Path, stem: &str) -> Result<std::path::PathBuf, DataError> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let path = dir.join(name);
        if path.exists() {
            return Ok(path);
        }
    }
    Err(DataError::Missing(format!("{stem}[.gz] in {}", dir.display())))
}

#[derive(Debug)]
struct Idx {
    dims: Vec<usize>,
    data: Vec<u8>,
}

fn read_idx(path: &Path) -> Result<Idx, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::io(path, e))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|msg| DataError::Format(format!("{}: {msg}", path.display())))
}

fn parse_idx(bytes: &[u8]) -> Result<Idx, String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (bad magic)".to_string());
    }
    if bytes[2] != 0x08 {
        return Err(format!("element type 0x{:02x} is not unsigned byte", bytes[2]));
    }
    let ndim = usize::from(bytes[3]);
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err("truncated header".to_string());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            let at = 4 + 4 * d;
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
        })
        .collect();
    let count: usize = dims.iter().product();
    if bytes.len() != header + count {
        return Err(format!("{} data bytes, header says {count}", bytes.len() - header));
    }
    Ok(Idx { dims, data: bytes[header..].to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_dims_and_data() {
        let idx = parse_idx(&encode(&[2, 1, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(idx.dims, vec![2, 1, 3]);
        assert_eq!(idx.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn rejects_truncated_data_and_bad_magic() {
        assert!(parse_idx(&encode(&[2, 2], &[1, 2, 3])).unwrap_err().contains("header says 4"));
        assert!(parse_idx(&[1, 2, 3, 4]).unwrap_err().contains("magic"));
    }

    #[test]
    fn loads_gzipped_and_plain_files_alike() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let images = encode(&[2, 2, 2], &[0, 1, 2, 3, 4, 5, 6, 7]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&images).unwrap();
        std::fs::write(dir.path().join("t10k-images-idx3-ubyte.gz"), gz.finish().unwrap()).unwrap();
        std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), encode(&[2], &[9, 3])).unwrap();
        let set = IdxSet::load(dir.path(), Split::Test).unwrap();
        assert_eq!(set.labels, vec![9, 3]);
        assert_eq!(set.image(1).data, vec![4, 5, 6, 7]);
    }
}
