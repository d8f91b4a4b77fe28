//! CUDA backend: finds devices without panicking on machines that have no
//! driver, loads the kernel modules embedded by `build.rs`, and launches them
//! (one launcher file per `kernels/*.cu`, named alike). Each launcher matches a CPU op of `backend::cpu` one to one.
//! GEMMs go through cuBLASLt ([`Blas`], created lazily per device, plans
//! cached per shape); `ops::cuda` implements the op layer's `Backend` with both.
//!
//! Nothing here is global: a [`CudaBackend`] is one device and one stream, so
//! several can live in one process (one per rank, later).

mod activations;
mod adamw;
mod attn_smem;
mod cast;
mod embedding;
mod flash_attn;
mod flash_attn_tc;
mod flash_attn_wgmma;
mod flash_attn_wgmma_bwd;
mod gemm;
mod launch_util;
mod logprob;
mod paged_attn;
mod paged_attn_tc;
mod patch_embed;
mod rmsnorm;
mod rope;
mod rows;
mod sampling;
mod softmax_kl;
mod topk_select;

pub use adamw::AdamWTensor;
pub use attn_smem::tc_dynamic_smem;
pub use flash_attn::FlashAttnShape;
pub use flash_attn_tc::{
    flash_tc_supports, tc_bwd_query_tile, tc_bwd_smem_bytes, tc_fwd_tile, TcFwdTile, TC_BWD_KEYS,
};
pub use flash_attn_wgmma::{
    flash_wgmma_supports, wgmma_disabled_by_env, wgmma_fwd_smem_bytes, WGMMA_MIN_SEQLEN_Q,
    WGMMA_QUERY_ROWS,
};
pub use flash_attn_wgmma_bwd::{wgmma_bwd_smem_bytes, WGMMA_BWD_KEYS};
pub use gemm::{blas_present, Blas, GemmElem, GemmImpl, GemmShape, Trans};
pub use launch_util::Elem;
pub use logprob::{LogitChunk, LOGPROB_STATE_PER_ROW};
pub use paged_attn_tc::{paged_tc_plan, paged_tc_scratch_len, paged_tc_supports, PagedTcPlan};
pub use patch_embed::PatchMask;
pub use rmsnorm::rmsnorm_bwd_scratch_len;
pub use rope::RopeFreqsDevice;

use crate::kernels;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DriverError,
};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver library (libcuda.so) on this machine")]
    NoDriver,
    #[error("the CUDA driver is present but reports no device")]
    NoDevice,
    #[error(
        "this binary was built without CUDA kernels ({0}); {hint}",
        hint = crate::backend::REBUILD_HINT
    )]
    NoKernels(&'static str),
    #[error("kernel module `{0}` is not embedded in this binary")]
    MissingModule(&'static str),
    #[error("shape not supported by kernel `{kernel}`: {reason}")]
    Unsupported {
        kernel: &'static str,
        reason: String,
    },
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
}

/// Whether libcuda can be loaded. cudarc panics on first use without it, so
/// every entry point checks this first.
pub fn driver_present() -> bool {
    // SAFETY: only attempts to dlopen the driver library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// What `info` and the benches print about a device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem_bytes: usize,
    pub multiprocessors: i32,
}

/// Lists the CUDA devices, or says why there are none.
pub fn list_devices() -> Result<Vec<DeviceInfo>, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    let count = CudaContext::device_count()?;
    (0..count as usize)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal)?;
            Ok(DeviceInfo {
                ordinal,
                name: ctx.name()?,
                compute_capability: ctx.compute_capability()?,
                total_mem_bytes: ctx.total_mem()?,
                multiprocessors: ctx
                    .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            })
        })
        .collect()
}

/// One device with every embedded kernel module loaded.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    /// cuBLAS handles, workspace and GEMM plans of this device, created on
    /// first use (kernel-only users never load libcublas).
    blas: OnceLock<Result<Blas, String>>,
    /// A buffer of ones (the bias-gradient GEMM's left operand), grown on
    /// demand and reused instead of uploaded per call.
    ones: std::sync::Mutex<Option<Arc<CudaSlice<f32>>>>,
}

impl CudaBackend {
    /// Opens device `ordinal` and loads the embedded modules it can run.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        if !kernels::kernels_embedded() {
            return Err(CudaError::NoKernels(kernels::BUILD_NOTE));
        }
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        if CudaContext::device_count()? <= ordinal as i32 {
            return Err(CudaError::NoDevice);
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.default_stream();
        let hopper = ctx.compute_capability()? == (9, 0);
        let mut modules = HashMap::new();
        for m in kernels::KERNEL_MODULES {
            // sm_90a SASS loads on no other device; its launchers fall back.
            if m.hopper_only() && !hopper {
                continue;
            }
            let image = cudarc::nvrtc::Ptx::from_binary(m.fatbin.to_vec());
            modules.insert(m.name, ctx.load_module(image)?);
        }
        Ok(Self {
            ctx,
            stream,
            modules,
            blas: OnceLock::new(),
            ones: std::sync::Mutex::new(None),
        })
    }

    /// This device's cuBLAS state (created on first call).
    pub fn blas(&self) -> Result<&Blas, CudaError> {
        self.blas
            .get_or_init(|| Blas::new(self.stream.clone()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| CudaError::Blas(e.clone()))
    }

    /// Row-major `C = alpha * op(A) op(B) + beta * C (+ bias[n] per row)`,
    /// the twin of `cpu::gemm::matmul` (plus `cpu::linear`'s bias): see
    /// [`Blas::gemm`]. fp32 operands never use TF32; bf16 operands
    /// accumulate in fp32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<I, O, A, B>(
        &self,
        shape: &GemmShape,
        alpha: f32,
        a: &A,
        b: &B,
        beta: f32,
        c: &mut CudaViewMut<'_, O>,
        bias: Option<&CudaView<'_, O>>,
    ) -> Result<(), CudaError>
    where
        I: GemmElem,
        O: GemmElem,
        A: DevicePtr<I>,
        B: DevicePtr<I>,
    {
        let fused = self.blas()?.gemm(shape, alpha, a, b, beta, c, bias)?;
        if let (false, Some(bias)) = (fused, bias) {
            self.add_bias_rows(c, bias, shape.m, shape.n)?;
        }
        Ok(())
    }

    /// At least `n` ones on the device.
    pub fn ones(&self, n: usize) -> Result<Arc<CudaSlice<f32>>, CudaError> {
        let mut cached = self.ones.lock().unwrap_or_else(|e| e.into_inner());
        match cached.as_ref() {
            Some(ones) if ones.len() >= n => Ok(ones.clone()),
            _ => {
                let ones = Arc::new(self.stream.clone_htod(&vec![1.0f32; n.max(1)])?);
                *cached = Some(ones.clone());
                Ok(ones)
            }
        }
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Whether module `name` is loaded (Hopper-only modules load on
    /// compute capability 9.0 only).
    fn has_module(&self, name: &str) -> bool {
        self.modules.contains_key(name)
    }

    fn function(&self, module: &'static str, name: &str) -> Result<CudaFunction, CudaError> {
        let m = self
            .modules
            .get(module)
            .ok_or(CudaError::MissingModule(module))?;
        Ok(m.load_function(name)?)
    }
}
