//! Bakes the location of libtorch into the worker's binaries and tests.
//!
//! `torch-sys` tells dependants where it found libtorch through
//! `DEP_TCH_LIBTORCH_LIB`. An rpath to that folder lets every binary start
//! without `LD_LIBRARY_PATH`, and the path is exported to the code so it can
//! open libtorch's CUDA library at start-up (the linker drops it otherwise,
//! because no symbol of it is referenced directly).

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report its libtorch folder; no rpath is set");
        println!("cargo:rustc-env=JEPA_LIBTORCH_LIB=");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=JEPA_LIBTORCH_LIB={lib}");
}
