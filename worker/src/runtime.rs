//! Start-up of libtorch: loads its CUDA library when it is there and picks
//! the device a command asked for.
//!
//! libtorch registers its CUDA backend from static initialisers inside
//! `libtorch_cuda.so`. Nothing in this crate calls that library by name, so
//! the linker leaves it out and CUDA would look absent even on a GPU host.
//! [`load_cuda`] opens it explicitly before any tensor is made.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tch::Device;

/// Folder holding the libtorch libraries this binary was built against.
pub const LIBTORCH_LIB: &str = env!("JEPA_LIBTORCH_LIB");

/// Errors of libtorch start-up and device selection.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The device string is not `cpu`, `cuda` or `cuda:N`.
    #[error("invalid device {0:?}: expected cpu, cuda or cuda:N")]
    InvalidDevice(String),
    /// CUDA was asked for but libtorch sees no usable CUDA device.
    #[error("device {requested} was requested but CUDA is not usable here ({reason})")]
    CudaUnavailable {
        /// The device string as given.
        requested: String,
        /// Why CUDA is not usable.
        reason: String,
    },
    /// `cuda:N` names a device beyond those present.
    #[error("device {requested} was requested but only {count} CUDA device(s) are present")]
    NoSuchCudaDevice {
        /// The device string as given.
        requested: String,
        /// Number of devices libtorch sees.
        count: usize,
    },
}

/// Outcome of trying to load libtorch's CUDA library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaLoad {
    /// The library was opened; CUDA may or may not have devices.
    Loaded(PathBuf),
    /// This libtorch build has no CUDA library (a CPU-only build).
    NotBuilt,
    /// The library exists but could not be opened (missing CUDA runtime).
    Failed(String),
}

/// Opens `libtorch_cuda.so` once per process, so libtorch registers its CUDA
/// backend. Safe to call from several places; later calls return the first
/// outcome.
pub fn load_cuda() -> &'static CudaLoad {
    static LOADED: OnceLock<CudaLoad> = OnceLock::new();
    LOADED.get_or_init(|| {
        let path = Path::new(LIBTORCH_LIB).join("libtorch_cuda.so");
        if !path.exists() {
            return CudaLoad::NotBuilt;
        }
        // SAFETY: loading a shared library runs its initialisers; this one is
        // libtorch's own CUDA backend, built together with the libtorch this
        // binary links, and it is loaded before any tensor exists.
        let opened = unsafe {
            libloading::os::unix::Library::open(
                Some(&path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        };
        match opened {
            Ok(library) => {
                // The backend must stay registered for the life of the process.
                std::mem::forget(library);
                CudaLoad::Loaded(path)
            }
            Err(err) => CudaLoad::Failed(err.to_string()),
        }
    })
}

/// Parses `cpu`, `cuda` or `cuda:N` into a device that is usable here.
///
/// # Errors
///
/// Fails with a message that says why when the string is malformed or names
/// a CUDA device this host does not have.
pub fn select_device(spec: &str) -> Result<Device, RuntimeError> {
    let spec = spec.trim();
    let index = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => spec
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| RuntimeError::InvalidDevice(spec.to_string()))?,
    };

    let reason = match load_cuda() {
        CudaLoad::NotBuilt => Some("this libtorch build has no CUDA support".to_string()),
        CudaLoad::Failed(err) => Some(format!("libtorch_cuda.so failed to load: {err}")),
        CudaLoad::Loaded(_) if !tch::Cuda::is_available() => {
            Some("no CUDA device or driver found".to_string())
        }
        CudaLoad::Loaded(_) => None,
    };
    if let Some(reason) = reason {
        return Err(RuntimeError::CudaUnavailable { requested: spec.to_string(), reason });
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        return Err(RuntimeError::NoSuchCudaDevice { requested: spec.to_string(), count });
    }
    Ok(Device::Cuda(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_selectable() {
        assert_eq!(select_device("cpu").unwrap(), Device::Cpu);
    }

    #[test]
    fn malformed_device_is_rejected_with_its_text() {
        let err = select_device("gpu0").unwrap_err();
        assert!(err.to_string().contains("\"gpu0\""), "{err}");
        assert!(matches!(select_device("cuda:x"), Err(RuntimeError::InvalidDevice(_))));
    }

    #[test]
    fn cuda_request_matches_what_libtorch_sees() {
        // On a host without a GPU the request must fail with a reason; on a
        // GPU host device 0 must be accepted.
        match select_device("cuda") {
            Ok(device) => assert_eq!(device, Device::Cuda(0)),
            Err(err) => assert!(err.to_string().contains("CUDA is not usable"), "{err}"),
        }
    }
}
