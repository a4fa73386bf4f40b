//! What a daemon offers the coordinator: its CUDA devices with their memory,
//! CPU slots and host memory.
//!
//! CUDA devices are read through the CUDA driver library (`libcuda.so.1`),
//! loaded at run time, so a host without a driver simply has no devices.

use std::ffi::{c_char, c_int, c_uint, CStr};

use jepa_common::proto;

/// CPU cores this process may use.
pub fn cpu_cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Total host memory in bytes, from `/proc/meminfo`; 0 where unreadable.
pub fn memory_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else { return 0 };
    text.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// CPU slots offered when `--cpu-slots` is not given: one per 8 cores, at
/// least one, so each CPU trainer gets several libtorch threads.
pub fn default_cpu_slots(cores: usize) -> u32 {
    u32::try_from((cores / 8).max(1)).unwrap_or(u32::MAX)
}

/// libtorch threads for one trainer: the cores shared evenly among the
/// slots (CPU and GPU) the daemon offers, at least one.
pub fn threads_per_trainer(cores: usize, cpu_slots: u32, gpus: usize) -> usize {
    let slots = (cpu_slots as usize).max(gpus).max(1);
    (cores / slots).max(1)
}

/// Which CUDA devices to offer: `all`, `none`, or indices such as `0,2`.
///
/// # Errors
///
/// Returns a message naming the value when it does not parse or names a
/// device the host lacks.
pub fn select_gpus(
    wanted: &str,
    detected: Vec<proto::GpuDevice>,
) -> Result<Vec<proto::GpuDevice>, String> {
    match wanted.trim() {
        "all" => Ok(detected),
        "none" | "" => Ok(Vec::new()),
        list => {
            let mut chosen = Vec::new();
            for item in list.split(',') {
                let index: u32 = item.trim().parse().map_err(|_| {
                    format!("--gpus {wanted:?}: {item:?} is not a device index; use all, none or 0,1,...")
                })?;
                let device = detected.iter().find(|d| d.index == index).ok_or_else(|| {
                    format!(
                        "--gpus {wanted:?}: device {index} does not exist; this host has {} CUDA device(s)",
                        detected.len()
                    )
                })?;
                chosen.push(device.clone());
            }
            Ok(chosen)
        }
    }
}

type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;

/// The CUDA devices of this host with name and memory; empty when the
/// driver library is missing or reports no device.
///
/// Limitation: this path has only run on hosts without a CUDA driver; the
/// driver calls follow the documented C API but have not met a real GPU.
pub fn cuda_devices() -> Vec<proto::GpuDevice> {
    match read_cuda_devices() {
        Ok(devices) => devices,
        Err(reason) => {
            tracing::debug!(%reason, "no CUDA devices");
            Vec::new()
        }
    }
}

fn read_cuda_devices() -> Result<Vec<proto::GpuDevice>, String> {
    // SAFETY: loading the CUDA driver runs its initialisers, which have no
    // preconditions; the symbols below have the C signatures of cuda.h.
    let lib = unsafe { libloading::Library::new("libcuda.so.1") }.map_err(|e| e.to_string())?;
    // SAFETY: each symbol is looked up with its documented signature.
    let (init, count, get, name, total) = unsafe {
        (
            lib.get::<CuInit>(b"cuInit\0").map_err(|e| e.to_string())?,
            lib.get::<CuDeviceGetCount>(b"cuDeviceGetCount\0").map_err(|e| e.to_string())?,
            lib.get::<CuDeviceGet>(b"cuDeviceGet\0").map_err(|e| e.to_string())?,
            lib.get::<CuDeviceGetName>(b"cuDeviceGetName\0").map_err(|e| e.to_string())?,
            lib.get::<CuDeviceTotalMem>(b"cuDeviceTotalMem_v2\0").map_err(|e| e.to_string())?,
        )
    };
    let check = |what: &str, code: c_int| {
        if code == 0 {
            Ok(())
        } else {
            Err(format!("{what} returned CUDA error {code}"))
        }
    };
    // SAFETY: plain driver calls with valid out-pointers to locals.
    unsafe {
        check("cuInit", init(0))?;
        let mut n: c_int = 0;
        check("cuDeviceGetCount", count(&raw mut n))?;
        let mut devices = Vec::new();
        for ordinal in 0..n {
            let mut device: c_int = 0;
            check("cuDeviceGet", get(&raw mut device, ordinal))?;
            let mut buf = [0 as c_char; 256];
            check("cuDeviceGetName", name(buf.as_mut_ptr(), 256, device))?;
            let mut bytes: usize = 0;
            check("cuDeviceTotalMem", total(&raw mut bytes, device))?;
            devices.push(proto::GpuDevice {
                index: u32::try_from(ordinal).unwrap_or(0),
                name: CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned(),
                memory_bytes: bytes as u64,
            });
        }
        Ok(devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32) -> proto::GpuDevice {
        proto::GpuDevice { index, name: format!("gpu{index}"), memory_bytes: 1 << 30 }
    }

    #[test]
    fn gpu_selection_names_bad_values() {
        let detected = vec![gpu(0), gpu(1)];
        assert_eq!(select_gpus("all", detected.clone()).unwrap().len(), 2);
        assert!(select_gpus("none", detected.clone()).unwrap().is_empty());
        let chosen = select_gpus("1", detected.clone()).unwrap();
        assert_eq!(chosen.iter().map(|d| d.index).collect::<Vec<_>>(), vec![1]);
        let err = select_gpus("0,5", detected.clone()).unwrap_err();
        assert!(err.contains("device 5 does not exist") && err.contains("2 CUDA"), "{err}");
        let err = select_gpus("x", detected).unwrap_err();
        assert!(err.contains("\"x\" is not a device index"), "{err}");
    }

    #[test]
    fn threads_share_the_cores() {
        assert_eq!(default_cpu_slots(2), 1);
        assert_eq!(default_cpu_slots(64), 8);
        assert_eq!(threads_per_trainer(16, 2, 0), 8);
        assert_eq!(threads_per_trainer(16, 2, 8), 2);
        assert_eq!(threads_per_trainer(2, 4, 0), 1);
    }

    #[test]
    fn host_memory_is_read() {
        assert!(memory_bytes() > 1 << 20, "MemTotal of /proc/meminfo");
        assert!(cpu_cores() >= 1);
    }
}
