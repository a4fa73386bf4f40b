//! The GPU backend: NCCL, loaded at run time.
//!
//! `libnccl.so.2` is opened with dlopen when a multi-rank CUDA run starts;
//! nothing links it, so the worker builds and runs where NCCL is missing and
//! says so clearly when a run needs it. The library is looked for by name
//! (libtorch's CUDA library has usually loaded it already), then in the
//! `nvidia/nccl/lib` folder of the PyTorch wheel that provides libtorch, or
//! at `JEPA_NCCL_LIB`.
//!
//! Rank 0 creates the unique id; the daemon publishes it through the
//! coordinator's rendezvous (as `nccl:<hex>`), and the other ranks join with
//! it. Every process sees one GPU (the daemon sets `CUDA_VISIBLE_DEVICES`),
//! so the communicator uses device 0. Collectives run on the legacy default
//! stream, the stream libtorch's kernels use unless told otherwise, so they
//! are ordered after the backward pass without extra events. A watchdog
//! aborts the communicator when an operation outlives the timeout, which
//! ends the attempt instead of hanging it.
//!
//! Limitation: only the loading, the version and the unique id have run on a
//! machine without a GPU; communicator set-up and the collectives have not
//! met a GPU yet.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::{flatten, scatter_back, Collective, CollectiveError};

/// `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UniqueId {
    /// The bytes.
    pub internal: [u8; 128],
}

const NCCL_FLOAT32: c_int = 7;
const NCCL_AVG: c_int = 4;
const NCCL_SUCCESS: c_int = 0;

type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut *mut c_void, c_int, UniqueId, c_int) -> c_int;
type Collect = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    *mut c_void,
    *mut c_void,
) -> c_int;
type CommOnly = unsafe extern "C" fn(*mut c_void) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

/// The NCCL entry points this backend uses.
struct Nccl {
    _lib: libloading::Library,
    get_version: GetVersion,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: Collect,
    broadcast: Collect,
    comm_abort: CommOnly,
    comm_destroy: CommOnly,
    error_string: GetErrorString,
}

fn failed(op: &'static str, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Failed { op, message: message.into() }
}

fn candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Ok(path) = std::env::var("JEPA_NCCL_LIB") {
        paths.push(PathBuf::from(path));
    }
    paths.push(PathBuf::from("libnccl.so.2"));
    // <site-packages>/torch/lib -> <site-packages>/nvidia/nccl/lib
    let torch_lib = PathBuf::from(crate::runtime::LIBTORCH_LIB);
    if let Some(site) = torch_lib.parent().and_then(|p| p.parent()) {
        paths.push(site.join("nvidia/nccl/lib/libnccl.so.2"));
    }
    paths
}

fn nccl() -> Result<&'static Nccl, CollectiveError> {
    static NCCL: OnceLock<Result<Nccl, String>> = OnceLock::new();
    NCCL.get_or_init(|| {
        crate::runtime::load_cuda();
        let mut tried = Vec::new();
        for path in candidates() {
            // SAFETY: opening NCCL runs its initialisers, which have no
            // preconditions.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => return bind(lib).map_err(|e| format!("{}: {e}", path.display())),
                Err(err) => tried.push(format!("{}: {err}", path.display())),
            }
        }
        Err(format!(
            "NCCL is not installed here (tried {}); install it or set JEPA_NCCL_LIB",
            tried.join("; ")
        ))
    })
    .as_ref()
    .map_err(|message| failed("nccl", message.clone()))
}

fn bind(lib: libloading::Library) -> Result<Nccl, libloading::Error> {
    // SAFETY: each symbol is looked up with the signature nccl.h declares.
    unsafe {
        Ok(Nccl {
            get_version: *lib.get::<GetVersion>(b"ncclGetVersion\0")?,
            get_unique_id: *lib.get::<GetUniqueId>(b"ncclGetUniqueId\0")?,
            comm_init_rank: *lib.get::<CommInitRank>(b"ncclCommInitRank\0")?,
            all_reduce: *lib.get::<Collect>(b"ncclAllReduce\0")?,
            broadcast: *lib.get::<Collect>(b"ncclBroadcast\0")?,
            comm_abort: *lib.get::<CommOnly>(b"ncclCommAbort\0")?,
            comm_destroy: *lib.get::<CommOnly>(b"ncclCommDestroy\0")?,
            error_string: *lib.get::<GetErrorString>(b"ncclGetErrorString\0")?,
            _lib: lib,
        })
    }
}

impl Nccl {
    fn check(&self, op: &'static str, code: c_int) -> Result<(), CollectiveError> {
        if code == NCCL_SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static C string for any code.
        let text = unsafe { CStr::from_ptr((self.error_string)(code)) };
        Err(failed(op, format!("NCCL error {code}: {}", text.to_string_lossy())))
    }
}

/// The NCCL version as NCCL encodes it (e.g. 22703 for 2.27.3).
///
/// # Errors
///
/// When NCCL cannot be loaded.
pub fn version() -> Result<i32, CollectiveError> {
    let nccl = nccl()?;
    let mut version: c_int = 0;
    // SAFETY: a valid out-pointer.
    nccl.check("nccl", unsafe { (nccl.get_version)(&raw mut version) })?;
    Ok(version)
}

/// Creates the unique id rank 0 shares with the others.
///
/// # Errors
///
/// When NCCL cannot be loaded or fails.
pub fn unique_id() -> Result<UniqueId, CollectiveError> {
    let nccl = nccl()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: a valid out-pointer to a 128-byte id.
    nccl.check("nccl", unsafe { (nccl.get_unique_id)(&raw mut id) })?;
    Ok(id)
}

impl UniqueId {
    /// `nccl:` and the id in hex, the rendezvous payload.
    pub fn to_text(&self) -> String {
        let hex: String = self.internal.iter().map(|b| format!("{b:02x}")).collect();
        format!("nccl:{hex}")
    }

    /// Parses [`UniqueId::to_text`].
    ///
    /// # Errors
    ///
    /// When the text is not `nccl:` and 256 hex digits.
    pub fn from_text(text: &str) -> Result<Self, CollectiveError> {
        let bad = || failed("nccl", format!("{text:?} is not an NCCL id (nccl:<256 hex digits>)"));
        let hex = text.strip_prefix("nccl:").ok_or_else(bad)?;
        if hex.len() != 256 {
            return Err(bad());
        }
        let mut internal = [0u8; 128];
        for (i, byte) in internal.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(UniqueId { internal })
    }
}

/// A communicator handle that may move to the watchdog thread.
#[derive(Clone, Copy, Debug)]
struct CommPtr(*mut c_void);

// SAFETY: NCCL communicators may be aborted from another thread; that is
// the only use the watchdog makes of it.
unsafe impl Send for CommPtr {}

/// One rank's NCCL communicator on device 0 of this process.
#[derive(Debug)]
pub struct NcclComm {
    comm: CommPtr,
    rank: usize,
    world: usize,
    timeout: Duration,
}

// SAFETY: the communicator is used from one thread at a time (the trainer's).
unsafe impl Send for NcclComm {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nccl")
    }
}

impl NcclComm {
    /// Joins the communicator of `world` ranks named by `id`.
    ///
    /// # Errors
    ///
    /// When NCCL is missing, no GPU is usable, or a peer does not join.
    pub fn init(
        id: &UniqueId,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let nccl = nccl()?;
        if !tch::Cuda::is_available() {
            return Err(failed("nccl", "NCCL needs a CUDA device and none is usable here"));
        }
        let (n, r) = (c_int::try_from(world).unwrap_or(0), c_int::try_from(rank).unwrap_or(0));
        let id = *id;
        // Joining blocks until every rank has joined, so it runs on a thread
        // the caller stops waiting for at the timeout; the process then ends
        // with the error, taking the blocked thread with it.
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut comm: *mut c_void = std::ptr::null_mut();
            // SAFETY: a valid out-pointer; the id is passed by value as
            // nccl.h declares.
            let code = unsafe { (nccl.comm_init_rank)(&raw mut comm, n, id, r) };
            let _ = sender.send((code, CommPtr(comm)));
        });
        let (code, comm) = receiver.recv_timeout(timeout).map_err(|_| {
            CollectiveError::Timeout { op: "nccl init", seconds: timeout.as_secs() }
        })?;
        nccl.check("nccl init", code)?;
        tracing::info!(rank, world, "NCCL communicator ready");
        Ok(NcclComm { comm, rank, world, timeout })
    }

    /// Waits for the device, aborting the communicator when the wait
    /// outlives the timeout (a dead or hung peer).
    fn wait(&self, op: &'static str) -> Result<(), CollectiveError> {
        let nccl = nccl()?;
        let (done, watch) = mpsc::channel::<()>();
        let comm = self.comm;
        let timeout = self.timeout;
        let watchdog = std::thread::spawn(move || {
            // The whole handle moves here, not its raw pointer field.
            let comm = comm;
            if watch.recv_timeout(timeout).is_err() {
                // SAFETY: aborting a live communicator from another thread
                // is what ncclCommAbort is for.
                unsafe { (nccl.comm_abort)(comm.0) };
                return true;
            }
            false
        });
        tch::Cuda::synchronize(0);
        let _ = done.send(());
        if watchdog.join().unwrap_or(true) {
            return Err(CollectiveError::Timeout { op, seconds: timeout.as_secs() });
        }
        Ok(())
    }

    fn run(
        &self,
        op: &'static str,
        call: Collect,
        flat: &Tensor,
        root_or_op: c_int,
    ) -> Result<(), CollectiveError> {
        let nccl = nccl()?;
        let count = flat.numel();
        let ptr = flat.data_ptr();
        // SAFETY: `flat` is a contiguous f32 CUDA tensor of `count`
        // elements on this process's device; in-place operation is allowed;
        // the null stream is libtorch's legacy default stream.
        let code = unsafe {
            call(ptr, ptr, count, NCCL_FLOAT32, root_or_op, self.comm.0, std::ptr::null_mut())
        };
        nccl.check(op, code)?;
        self.wait(op)
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, tensors: &[&Tensor]) -> Result<(), CollectiveError> {
        if tensors.is_empty() {
            return Ok(());
        }
        if tensors.iter().any(|t| t.device() == Device::Cpu) {
            return Err(failed("all_reduce", "the NCCL backend reduces CUDA tensors only"));
        }
        let flat = flatten(tensors);
        self.run("all_reduce", nccl()?.all_reduce, &flat, NCCL_AVG)?;
        scatter_back(&flat, tensors);
        Ok(())
    }

    fn broadcast(&mut self, tensors: &[&Tensor]) -> Result<(), CollectiveError> {
        if tensors.is_empty() {
            return Ok(());
        }
        let flat = flatten(tensors);
        self.run("broadcast", nccl()?.broadcast, &flat, 0)?;
        scatter_back(&flat, tensors);
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let token = Tensor::ones([1], (Kind::Float, Device::Cuda(0)));
        self.all_reduce_mean(&[&token])
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if let Ok(nccl) = nccl() {
            // SAFETY: the communicator is not used after this.
            unsafe { (nccl.comm_destroy)(self.comm.0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_travel_as_text() {
        let mut id = UniqueId { internal: [0; 128] };
        for (i, b) in id.internal.iter_mut().enumerate() {
            *b = u8::try_from(i * 2 % 256).unwrap();
        }
        let text = id.to_text();
        assert!(text.starts_with("nccl:") && text.len() == 5 + 256);
        assert_eq!(UniqueId::from_text(&text).unwrap(), id);
        assert!(UniqueId::from_text("nccl:zz").is_err());
        assert!(UniqueId::from_text("127.0.0.1:5000").is_err());
    }

    /// NCCL ships with the PyTorch wheel this project builds against, so it
    /// loads even on a CPU machine; a communicator needs a GPU.
    #[test]
    fn nccl_loads_and_makes_ids_or_says_why_not() {
        match version() {
            Ok(version) => {
                assert!(version >= 20_000, "NCCL version {version}");
                let a = unique_id().unwrap();
                let b = unique_id().unwrap();
                assert_ne!(a, b, "two ids must differ");
                if !tch::Cuda::is_available() {
                    let err = NcclComm::init(&a, 0, 2, Duration::from_secs(1)).unwrap_err();
                    assert!(err.to_string().contains("needs a CUDA device"), "{err}");
                }
            }
            Err(err) => assert!(err.to_string().contains("NCCL is not installed"), "{err}"),
        }
    }
}
