//! Where `build.rs` looks for nvcc, in order. Shared with
//! `tests/build_nvcc.rs` (by `#[path]`), so the search order is tested.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where CUDA installs itself when no variable says otherwise (the
/// NVIDIA installers and distribution packages).
pub const STANDARD_CUDA_DIRS: &[&str] = &["/usr/local/cuda", "/opt/cuda"];

/// Every place nvcc may be, best first: `$NVCC`, `$CUDA_HOME/bin`,
/// `$CUDA_PATH/bin`, the project's pinned `.cuda-toolchain/`, each `PATH`
/// entry, then the standard install folders. `var` reads the environment.
pub fn nvcc_candidates(
    var: &dyn Fn(&str) -> Option<OsString>,
    manifest_dir: &Path,
) -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = var("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for name in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = var(name) {
            candidates.push(Path::new(&home).join("bin/nvcc"));
        }
    }
    let lib = manifest_dir.join(".cuda-toolchain/lib");
    if let Ok(entries) = std::fs::read_dir(&lib) {
        let mut pythons: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        pythons.sort();
        for py in pythons {
            candidates.push(py.join("site-packages/nvidia/cu13/bin/nvcc"));
        }
    }
    if let Some(path) = var("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    // A CUDA install that is not on PATH (a fresh cloud image often has
    // /usr/local/cuda without exporting it) still gives the GPU build.
    candidates.extend(
        STANDARD_CUDA_DIRS
            .iter()
            .map(|d| Path::new(d).join("bin/nvcc")),
    );
    candidates
}

/// The first candidate that exists.
pub fn find_nvcc(var: &dyn Fn(&str) -> Option<OsString>, manifest_dir: &Path) -> Option<PathBuf> {
    nvcc_candidates(var, manifest_dir)
        .into_iter()
        .find(|c| c.is_file())
}
