//! The scalar type CPU ops compute in: f32 when running, f64 for gradient
//! checks against finite differences.

use std::fmt::Debug;

pub trait Real:
    num_traits::Float + num_traits::NumAssign + std::iter::Sum + Send + Sync + Default + Debug + 'static
{
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn erf(self) -> Self;

    /// Serial `C = alpha * A B + beta * C` on raw strided matrices.
    ///
    /// # Safety
    /// Every element addressed through the pointers and strides for the given
    /// `m`, `k`, `n` must be in bounds, and `c` must not alias `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

/// Both float types implement `Real` the same way; only the libm and GEMM
/// entry points differ.
macro_rules! impl_real {
    ($t:ty, $erf:path, $gemm:path) => {
        impl Real for $t {
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn erf(self) -> Self {
                $erf(self)
            }
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                // SAFETY: forwarded from the caller's contract.
                unsafe { $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc) }
            }
        }
    };
}

impl_real!(f32, libm::erff, matrixmultiply::sgemm);
impl_real!(f64, libm::erf, matrixmultiply::dgemm);
