//! GEMMs on the device through cuBLASLt (no kernel of ours), with the
//! row-major conventions of [`crate::backend::cpu::gemm::matmul`]:
//! `C[m, n] = alpha * op(A) op(B) + beta * C (+ bias[n] on every row)`,
//! where `op(A)` is `[m, k]` (`A` stored `[m, k]`, or `[k, m]` with
//! [`Trans::Yes`]) and `op(B)` is `[k, n]` (`B` stored `[k, n]`, or `[n, k]`
//! with [`Trans::Yes`]: the `nn.Linear` weight).
//!
//! cuBLAS is column-major; a row-major `C = A B` is the column-major
//! `C^T = B^T A^T`, so B goes in cuBLAS's A slot and A in its B slot.
//!
//! Precision: fp32 inputs use `CUBLAS_COMPUTE_32F` (never TF32: parity with
//! the CPU); bf16 inputs accumulate in fp32 too, with f32 or bf16 output.
//! One [`Blas`] per device (it hangs off the [`super::CudaBackend`]): a
//! cuBLASLt handle, its workspace, and the matmul plans (descriptors,
//! layouts, chosen algorithm) cached per shape, types and pointer alignment.
//! A shape cuBLASLt has no algorithm for falls back to classic cuBLAS
//! (`cublasGemmEx`, same compute type) plus the bias kernel of `rows.cu`.

use super::launch_util::Elem;
use super::CudaError;
pub use crate::backend::cpu::gemm::Trans;
use cudarc::cublas::{result as cb, sys as cbs};
use cudarc::cublaslt::{result as lt, sys as lts};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// Element types a GEMM reads or writes.
pub trait GemmElem: Elem {
    const LT_TYPE: lts::cudaDataType_t;
    const BLAS_TYPE: cbs::cudaDataType_t;
}

impl GemmElem for f32 {
    const LT_TYPE: lts::cudaDataType_t = lts::cudaDataType_t::CUDA_R_32F;
    const BLAS_TYPE: cbs::cudaDataType_t = cbs::cudaDataType_t::CUDA_R_32F;
}

impl GemmElem for half::bf16 {
    const LT_TYPE: lts::cudaDataType_t = lts::cudaDataType_t::CUDA_R_16BF;
    const BLAS_TYPE: cbs::cudaDataType_t = cbs::cudaDataType_t::CUDA_R_16BF;
}

/// A row-major GEMM `C[m, n] = op(A)[m, k] op(B)[k, n]` (dense operands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub trans_a: Trans,
    pub trans_b: Trans,
}

impl GemmShape {
    /// `y[tokens, out] = x[tokens, in] @ w[out, in]^T`: the Linear layer.
    pub fn linear(tokens: usize, in_features: usize, out_features: usize) -> Self {
        Self {
            m: tokens,
            k: in_features,
            n: out_features,
            trans_a: Trans::No,
            trans_b: Trans::Yes,
        }
    }

    /// The cuBLAS (column-major) call computing this row-major GEMM:
    /// `(transa, transb, m, n, k, lda, ldb, ldc)` with B in the A slot.
    pub fn column_major(&self) -> ColumnMajorGemm {
        ColumnMajorGemm {
            trans_a: self.trans_b == Trans::Yes,
            trans_b: self.trans_a == Trans::Yes,
            m: self.n,
            n: self.m,
            k: self.k,
            // B stored [k, n] row-major is [n, k] column-major with ld n;
            // stored [n, k] (transposed) it is [k, n] column-major, ld k.
            lda: if self.trans_b == Trans::Yes {
                self.k
            } else {
                self.n
            },
            ldb: if self.trans_a == Trans::Yes {
                self.m
            } else {
                self.k
            },
            ldc: self.n,
        }
    }

    fn a_len(&self) -> usize {
        self.m * self.k
    }
    fn b_len(&self) -> usize {
        self.k * self.n
    }
    fn c_len(&self) -> usize {
        self.m * self.n
    }
}

/// The column-major form of a [`GemmShape`] (what cuBLAS is told).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ColumnMajorGemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl ColumnMajorGemm {
    /// Rows and columns of the stored A-slot and B-slot matrices.
    fn a_stored(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }
    fn b_stored(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }
}

/// Largest power of two (at most 256) dividing a device address: what the
/// cuBLASLt heuristic may assume about the pointer.
pub fn pointer_alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        (1u64 << ptr.trailing_zeros().min(8)) as u32
    }
}

/// What a cached plan depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    shape: ColumnMajorGemm,
    in_type: u32,
    out_type: u32,
    bias: bool,
    /// Alignment of the A-slot, B-slot and C/D pointers.
    align: [u32; 3],
}

/// Descriptors and the chosen algorithm of one matmul shape.
struct Plan {
    desc: lts::cublasLtMatmulDesc_t,
    layouts: [lts::cublasLtMatrixLayout_t; 3],
    algo: lts::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the descriptors were created by this plan and are destroyed
        // once; errors at teardown are ignored.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

/// How [`Blas`] runs GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmImpl {
    /// cuBLASLt (bias fused in the epilogue), classic cuBLAS when
    /// cuBLASLt has no algorithm for a shape.
    Lt,
    /// Classic cuBLAS only (tests cover both paths).
    Classic,
}

struct BlasState {
    mode: GemmImpl,
    plans: HashMap<PlanKey, Option<Plan>>,
    /// cuBLASLt calls that failed and went to classic cuBLAS (diagnostics).
    lt_failures: Vec<String>,
    classic: Option<cudarc::cublas::CudaBlas>,
}

/// The cuBLAS side of one device: created once, lazily (so the kernel
/// tests do not need libcublas).
pub struct Blas {
    stream: Arc<CudaStream>,
    lt: lts::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    state: Mutex<BlasState>,
}

// SAFETY: the cuBLASLt handle is only used under `state`'s lock or through
// thread-safe cuBLASLt entry points; cuBLAS handles may move between threads.
unsafe impl Send for Blas {}
// SAFETY: as above: every call that uses the handles takes the state lock.
unsafe impl Sync for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            s.plans.clear();
        }
        // SAFETY: the handle was created in `new` and is destroyed once,
        // after every plan that refers to it.
        unsafe {
            let _ = lt::destroy_handle(self.lt);
        }
    }
}

fn blas_err(what: &str, e: impl std::fmt::Debug) -> CudaError {
    CudaError::Blas(format!("{what}: {e:?}"))
}

/// Whether libcublasLt and libcublas can be loaded (cudarc panics on first
/// use without them).
pub fn blas_present() -> bool {
    // SAFETY: only attempts to dlopen the libraries by their usual names.
    unsafe { lts::is_culib_present() && cbs::is_culib_present() }
}

impl Blas {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, CudaError> {
        if !blas_present() {
            return Err(CudaError::Blas(
                "libcublasLt / libcublas not found: put the directory holding libcublasLt.so.13 \
                 (e.g. pip's nvidia/cu13/lib) on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        stream.context().bind_to_thread()?;
        let major = stream.context().attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        )?;
        // NVIDIA's recommendation: 32 MiB on Hopper, 4 MiB before.
        let ws = if major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream.alloc_zeros::<u8>(ws)?;
        let handle = lt::create_handle().map_err(|e| blas_err("cublasLtCreate", e))?;
        Ok(Self {
            stream,
            lt: handle,
            workspace,
            state: Mutex::new(BlasState {
                mode: GemmImpl::Lt,
                plans: HashMap::new(),
                lt_failures: Vec::new(),
                classic: None,
            }),
        })
    }

    /// Chooses the GEMM path for later calls (tests exercise both).
    pub fn set_mode(&self, mode: GemmImpl) {
        self.state.lock().expect("blas state lock").mode = mode;
    }

    /// Number of cached cuBLASLt plans (shapes seen).
    pub fn cached_plans(&self) -> usize {
        self.state.lock().map_or(0, |s| s.plans.len())
    }

    /// Shapes cuBLASLt had no algorithm for (heuristic) or failed to run,
    /// served by classic cuBLAS instead.
    pub fn lt_fallbacks(&self) -> (usize, Vec<String>) {
        self.state.lock().map_or((0, Vec::new()), |s| {
            (
                s.plans.values().filter(|p| p.is_none()).count(),
                s.lt_failures.clone(),
            )
        })
    }

    fn make_plan(&self, key: &PlanKey) -> Result<Option<Plan>, CudaError> {
        let s = key.shape;
        let in_t = if key.in_type == 1 {
            lts::cudaDataType_t::CUDA_R_16BF
        } else {
            lts::cudaDataType_t::CUDA_R_32F
        };
        let out_t = if key.out_type == 1 {
            lts::cudaDataType_t::CUDA_R_16BF
        } else {
            lts::cudaDataType_t::CUDA_R_32F
        };
        let desc = lt::create_matmul_desc(
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lts::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| blas_err("cublasLtMatmulDescCreate", e))?;
        let (ar, ac) = s.a_stored();
        let (br, bc) = s.b_stored();
        let mk = |t, r: usize, c: usize, ld: usize| {
            lt::create_matrix_layout(t, r as u64, c as u64, ld as i64)
                .map_err(|e| blas_err("cublasLtMatrixLayoutCreate", e))
        };
        let layouts = [
            mk(in_t, ar, ac, s.lda)?,
            mk(in_t, br, bc, s.ldb)?,
            mk(out_t, s.m, s.n, s.ldc)?,
        ];
        let mut plan = Plan {
            desc,
            // The algorithm is filled in below; a zeroed one is never used.
            // SAFETY: cublasLtMatmulAlgo_t is plain data (an array of u64).
            algo: unsafe { std::mem::zeroed() },
            layouts,
        };
        let set_desc = |attr, v: &i32| {
            // SAFETY: the attribute takes a 4-byte value, passed by pointer.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    v as *const i32 as *const c_void,
                    std::mem::size_of::<i32>(),
                )
            }
            .map_err(|e| blas_err("cublasLtMatmulDescSetAttribute", e))
        };
        use lts::cublasLtMatmulDescAttributes_t as D;
        let op = |t: bool| {
            if t {
                cbs::cublasOperation_t::CUBLAS_OP_T as i32
            } else {
                cbs::cublasOperation_t::CUBLAS_OP_N as i32
            }
        };
        set_desc(D::CUBLASLT_MATMUL_DESC_TRANSA, &op(s.trans_a))?;
        set_desc(D::CUBLASLT_MATMUL_DESC_TRANSB, &op(s.trans_b))?;
        if key.bias {
            set_desc(
                D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &(lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as i32),
            )?;
            // The bias has the output's type (f32 with f32 output, bf16 with bf16).
            set_desc(D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &(out_t as i32))?;
        }
        let pref =
            lt::create_matmul_pref().map_err(|e| blas_err("cublasLtMatmulPreferenceCreate", e))?;
        let ws = self.workspace.len();
        let result = (|| {
            use lts::cublasLtMatmulPreferenceAttributes_t as P;
            // SAFETY: each attribute is passed with its documented size.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const usize as *const c_void,
                    std::mem::size_of::<usize>(),
                )?;
                for (attr, a) in [
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align[0]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align[1]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align[2]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align[2]),
                ] {
                    lt::set_matmul_pref_attribute(
                        pref,
                        attr,
                        &a as *const u32 as *const c_void,
                        std::mem::size_of::<u32>(),
                    )?;
                }
                lt::get_matmul_algo_heuristic(
                    self.lt,
                    plan.desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                )
            }
        })();
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        match result {
            Ok(h) => {
                plan.algo = h.algo;
                Ok(Some(plan))
            }
            // No algorithm for this shape/alignment: classic cuBLAS instead.
            // No algorithm for this shape/alignment (or a layout cuBLASLt
            // refuses): classic cuBLAS instead, which reports real errors.
            Err(_) => Ok(None),
        }
    }

    /// `C = alpha * op(A) op(B) + beta * C (+ bias)` on the device's
    /// stream, row-major (see the module doc). Operands may be sub-slices of
    /// larger buffers; they must hold at least the shape's element counts.
    /// Returns whether the bias was added (fused in the cuBLASLt epilogue);
    /// when not, the caller adds it ([`super::CudaBackend::gemm`] does).
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
    ) -> Result<bool, CudaError>
    where
        I: GemmElem,
        O: GemmElem,
        A: DevicePtr<I>,
        B: DevicePtr<I>,
    {
        const K: &str = "gemm";
        for (what, have, want) in [
            ("A", a.len(), shape.a_len()),
            ("B", b.len(), shape.b_len()),
            ("C", c.len(), shape.c_len()),
        ] {
            super::launch_util::need(K, what, have, want)?;
        }
        if let Some(bias) = bias {
            super::launch_util::need(K, "bias", bias.len(), shape.n)?;
        }
        if shape.m == 0 || shape.n == 0 {
            return Ok(true);
        }
        for (what, v) in [("m", shape.m), ("n", shape.n), ("k", shape.k)] {
            super::launch_util::to_i32(K, what, v)?;
        }
        let cm = shape.column_major();
        let stream = &self.stream;
        let mut state = self.state.lock().expect("blas state lock");
        // Each pointer's SyncOnDrop guard records the stream's use on drop.
        let (b_ptr, _gb) = b.device_ptr(stream);
        let (a_ptr, _ga) = a.device_ptr(stream);
        let (c_ptr, _gc) = c.device_ptr_mut(stream);
        let bias_ptr = bias.map(|bb| bb.device_ptr(stream));
        // cuBLASLt reads the bias through the epilogue only when its
        // pointer is 16-byte aligned; otherwise the bias kernel adds it.
        let fuse_bias = bias_ptr.as_ref().is_some_and(|(p, _)| p % 16 == 0);
        let mut done = false;
        let mut lt_error = None;
        if state.mode == GemmImpl::Lt && shape.k > 0 {
            let key = PlanKey {
                shape: cm,
                in_type: u32::from(I::SUFFIX == "bf16"),
                out_type: u32::from(O::SUFFIX == "bf16"),
                bias: fuse_bias,
                align: [
                    pointer_alignment(b_ptr),
                    pointer_alignment(a_ptr),
                    pointer_alignment(c_ptr),
                ],
            };
            if let std::collections::hash_map::Entry::Vacant(e) = state.plans.entry(key) {
                e.insert(self.make_plan(&key)?);
            }
            if let Some(plan) = state.plans.get(&key).and_then(Option::as_ref) {
                if let Some((p, _)) = &bias_ptr {
                    if fuse_bias {
                        // SAFETY: the attribute takes a device pointer by pointer.
                        unsafe {
                            lt::set_matmul_desc_attribute(
                                plan.desc,
                                lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                p as *const u64 as *const c_void,
                                std::mem::size_of::<u64>(),
                            )
                        }
                        .map_err(|e| blas_err("cublasLtMatmulDescSetAttribute(bias)", e))?;
                    }
                }
                let (ws_ptr, _gw) = self.workspace.device_ptr(stream);
                // SAFETY: the layouts describe the operands, whose lengths
                // were checked against the shape; the plan's algorithm was
                // chosen for these pointers' alignments and this workspace.
                let launched = unsafe {
                    lt::matmul(
                        self.lt,
                        plan.desc,
                        &alpha as *const f32 as *const c_void,
                        &beta as *const f32 as *const c_void,
                        b_ptr as *const c_void,
                        plan.layouts[0],
                        a_ptr as *const c_void,
                        plan.layouts[1],
                        c_ptr as *const c_void,
                        plan.layouts[2],
                        c_ptr as *mut c_void,
                        plan.layouts[2],
                        &plan.algo,
                        ws_ptr as *mut c_void,
                        self.workspace.len(),
                        stream.cu_stream() as *mut _,
                    )
                };
                match launched {
                    Ok(()) => done = true,
                    Err(e) => lt_error = Some(format!("cublasLtMatmul: {e:?}")),
                }
            }
            if let Some(e) = lt_error {
                // This shape goes through classic cuBLAS from now on.
                state.plans.insert(key, None);
                state.lt_failures.push(format!("{cm:?}: {e}"));
            }
        }
        if !done {
            if state.classic.is_none() {
                let h = cudarc::cublas::CudaBlas::new(stream.clone())
                    .map_err(|e| blas_err("cublasCreate", e))?;
                // SAFETY: a valid handle; default math never uses TF32 for
                // CUBLAS_COMPUTE_32F.
                unsafe {
                    cbs::cublasSetMathMode(*h.handle(), cbs::cublasMath_t::CUBLAS_DEFAULT_MATH)
                }
                .result()
                .map_err(|e| blas_err("cublasSetMathMode", e))?;
                state.classic = Some(h);
            }
            let h = state.classic.as_ref().expect("classic handle");
            let op = |t: bool| {
                if t {
                    cbs::cublasOperation_t::CUBLAS_OP_T
                } else {
                    cbs::cublasOperation_t::CUBLAS_OP_N
                }
            };
            // SAFETY: operand lengths checked against the shape; the leading
            // dimensions are those of dense row-major operands; the handle
            // runs on this backend's stream.
            unsafe {
                cb::gemm_ex(
                    *h.handle(),
                    op(cm.trans_a),
                    op(cm.trans_b),
                    cm.m as i32,
                    cm.n as i32,
                    cm.k as i32,
                    &alpha as *const f32 as *const c_void,
                    b_ptr as *const c_void,
                    I::BLAS_TYPE,
                    cm.lda.max(1) as i32,
                    a_ptr as *const c_void,
                    I::BLAS_TYPE,
                    cm.ldb.max(1) as i32,
                    &beta as *const f32 as *const c_void,
                    c_ptr as *mut c_void,
                    O::BLAS_TYPE,
                    cm.ldc.max(1) as i32,
                    cbs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cbs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| blas_err("cublasGemmEx", e))?;
        }
        Ok(done && fuse_bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_maps_to_the_swapped_column_major_call() {
        // y[5, 3] = x[5, 7] @ w[3, 7]^T: cuBLAS computes y^T[3, 5] = w x^T.
        let cm = GemmShape::linear(5, 7, 3).column_major();
        assert_eq!(
            cm,
            ColumnMajorGemm {
                trans_a: true,
                trans_b: false,
                m: 3,
                n: 5,
                k: 7,
                lda: 7,
                ldb: 7,
                ldc: 3,
            }
        );
        assert_eq!(cm.a_stored(), (7, 3));
        assert_eq!(cm.b_stored(), (7, 5));
    }

    #[test]
    fn transposed_a_reads_a_as_stored_k_by_m() {
        // C[4, 6] = A^T B with A stored [2, 4], B stored [2, 6].
        let s = GemmShape {
            m: 4,
            k: 2,
            n: 6,
            trans_a: Trans::Yes,
            trans_b: Trans::No,
        };
        let cm = s.column_major();
        assert!(!cm.trans_a && cm.trans_b);
        assert_eq!((cm.lda, cm.ldb, cm.ldc), (6, 4, 6));
        assert_eq!(cm.a_stored(), (6, 2));
        assert_eq!(cm.b_stored(), (4, 2));
    }

    #[test]
    fn alignment_is_capped_at_256() {
        assert_eq!(pointer_alignment(0x7f00_0000_0000), 256);
        assert_eq!(pointer_alignment(0x7f00_0000_0080), 128);
        assert_eq!(pointer_alignment(0x7f00_0000_0004), 4);
    }
}
