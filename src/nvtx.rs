//! Optional NVTX ranges, so that Nsight Systems shows the phases of a
//! training step (rollout, old log-probs, perturbed pass, update).
//!
//! Zero cost on ordinary runs: ranges are emitted only when a profiler
//! injects itself into NVTX (nsys and ncu set `NVTX_INJECTION64_PATH`) or
//! `VPPO_NVTX=1` is set, AND the NVTX library can be loaded at run time
//! (cudarc's `nvtx` feature dlopens `libnvToolsExt.so[.1]`; pip's
//! `nvidia-nvtx` wheel ships it as `libnvtx3interop.so.1`: symlink it as
//! `libnvToolsExt.so.1` on `LD_LIBRARY_PATH`). Otherwise [`range`] returns a
//! guard that does nothing, after one cached check.
//!
//! ```text
//! nsys profile -t cuda,nvtx vppo-engine train ...
//! ```

use std::sync::OnceLock;

/// Whether ranges are emitted in this process (decided once).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let wanted = std::env::var_os("NVTX_INJECTION64_PATH").is_some()
            || std::env::var("VPPO_NVTX").is_ok_and(|v| v == "1");
        // SAFETY: only tries to dlopen the NVTX library by its usual names;
        // cudarc panics on first use without it, so this probe comes first.
        wanted && unsafe { cudarc::nvtx::sys::is_culib_present() }
    })
}

/// An NVTX range that ends when dropped (or nothing, see the module doc).
#[must_use = "the range ends when this guard is dropped"]
pub struct Range(#[allow(dead_code)] Option<cudarc::nvtx::Range>);

/// Starts a named range; it ends when the returned guard is dropped.
pub fn range(name: &'static str) -> Range {
    Range(enabled().then(|| cudarc::nvtx::scoped_range(name)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges_are_no_ops_without_a_profiler() {
        // No profiler and no NVTX library in the test environment: the guard
        // must be inert (and never panic).
        let r = super::range("test");
        drop(r);
    }
}
