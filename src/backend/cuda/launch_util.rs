//! Small helpers shared by the kernel launchers.

use super::CudaError;
use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
use cudarc::driver::{CudaFunction, LaunchConfig};

pub(super) const BLOCK: u32 = 256;

pub(super) fn to_i32(kernel: &'static str, what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Unsupported {
        kernel,
        reason: format!("{what} = {v} exceeds i32"),
    })
}

/// A buffer must hold at least `want` elements.
pub(super) fn need(
    kernel: &'static str,
    what: &str,
    have: usize,
    want: usize,
) -> Result<(), CudaError> {
    if have < want {
        Err(CudaError::Unsupported {
            kernel,
            reason: format!("{what} holds {have} elements, needs {want}"),
        })
    } else {
        Ok(())
    }
}

/// One thread per element (grid-stride loops cover the rest).
pub(super) fn elementwise_grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(BLOCK as usize).clamp(1, 65_535 * 16) as u32,
            1,
            1,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block of `threads` per row.
pub(super) fn row_grid(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Storage types of the kernels that come in f32 and bf16 variants; the
/// kernel name ends in the suffix (`swiglu_fwd_bf16`).
pub trait Elem: cudarc::driver::DeviceRepr + Copy {
    const SUFFIX: &'static str;
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Lets `f` use `bytes` of dynamic shared memory (above 48 KiB needs this).
pub(super) fn opt_in_smem(f: &CudaFunction, bytes: usize) -> Result<(), CudaError> {
    f.set_attribute(
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )?;
    Ok(())
}
