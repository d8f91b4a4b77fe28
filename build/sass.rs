//! Tensor-core instructions per kernel, read from `cuobjdump -sass`: the
//! proof, without a GPU, that a kernel computes on tensor cores (`HMMA` =
//! mma.sync on sm_80/sm_90, `HGMMA` = warpgroup MMA on sm_90a). Used by
//! `build.rs` (the counts `vppo-engine info` prints) and tested in
//! `tests/build_sass.rs` (by `#[path]`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// MMA instructions of one kernel in one architecture's SASS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmaCount {
    pub arch: String,
    pub function: String,
    pub hmma: u32,
    pub hgmma: u32,
}

/// Counts per (arch, function) in the text of `cuobjdump -sass`, which
/// reads `code for sm_80`, then per kernel `Function : name` followed by
/// its instructions, one a line (`/*0140*/ HMMA.16816.F32.BF16 R4, ...`).
pub fn mma_counts(sass: &str) -> Vec<MmaCount> {
    let mut out: Vec<MmaCount> = Vec::new();
    let mut arch = String::new();
    for line in sass.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("code for ") {
            arch = rest.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("Function : ") {
            out.push(MmaCount {
                arch: arch.clone(),
                function: rest.trim().to_string(),
                hmma: 0,
                hgmma: 0,
            });
        } else if let Some(current) = out.last_mut() {
            // The opcode follows the /*address*/ column (and an optional
            // predicate such as @P0).
            let opcode = line
                .split_whitespace()
                .find(|w| !(w.starts_with("/*") || w.starts_with('@')))
                .unwrap_or("");
            if opcode.starts_with("HMMA") {
                current.hmma += 1;
            } else if opcode.starts_with("HGMMA") {
                current.hgmma += 1;
            }
        }
    }
    out
}

/// cuobjdump beside nvcc (the pinned wheels share one bin folder, a CUDA
/// install has both in bin/), else `$CUOBJDUMP`.
pub fn find_cuobjdump(nvcc: &Path, cuobjdump_var: Option<PathBuf>) -> Option<PathBuf> {
    let beside = nvcc.with_file_name("cuobjdump");
    if beside.is_file() {
        return Some(beside);
    }
    cuobjdump_var.filter(|p| p.is_file())
}

/// `cuobjdump -sass fatbin`, with cuobjdump's folder on PATH for the
/// nvdisasm it calls. `Err` says why not.
pub fn dump_sass(cuobjdump: &Path, fatbin: &Path) -> Result<String, String> {
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = cuobjdump.parent() {
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&path));
        path = std::env::join_paths(dirs).map_err(|e| e.to_string())?;
    }
    let out = Command::new(cuobjdump)
        .arg("-sass")
        .arg(fatbin)
        .env("PATH", path)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", cuobjdump.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -sass {} failed: {}",
            cuobjdump.display(),
            fatbin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
