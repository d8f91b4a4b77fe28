//! cuBLAS GEMMs (f32 and bf16 operands, bias epilogue, unaligned operands,
//! the classic fallback) against `cpu::gemm::matmul` (+ the Linear bias).

use super::model::NO_CUBLAS;
use super::{check, cuda, drv, random, Case, FP32_TOL};
use half::bf16;
use vppo_engine::backend::cpu::gemm::{matmul, Trans};
use vppo_engine::backend::cuda::{blas_present, GemmImpl, GemmShape};

fn t_name(t: Trans) -> &'static str {
    match t {
        Trans::No => "N",
        Trans::Yes => "T",
    }
}

/// Row-major reference `C = A op B + bias` on the CPU.
#[allow(clippy::too_many_arguments)]
fn cpu_gemm(
    s: &GemmShape,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c0: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut c = c0.to_vec();
    matmul(s.m, s.k, s.n, 1.0, a, s.trans_a, b, s.trans_b, beta, &mut c);
    if let Some(bias) = bias {
        for row in c.chunks_mut(s.n.max(1)) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
    c
}

/// f32 GEMM; `offset` shifts every operand by that many elements inside a
/// larger buffer (unaligned pointers for the cuBLASLt heuristic).
#[allow(clippy::too_many_arguments)]
fn gemm_case(
    m: usize,
    k: usize,
    n: usize,
    ta: Trans,
    tb: Trans,
    bias: bool,
    beta: f32,
    offset: usize,
    mode: GemmImpl,
) -> Case {
    Case {
        name: format!(
            "gemm f32 {mode:?} {m}x{k}x{n} {}{}{}{}{}",
            t_name(ta),
            t_name(tb),
            if bias { " bias" } else { "" },
            if beta != 0.0 { " beta" } else { "" },
            if offset > 0 { " offset" } else { "" },
        ),
        run: Box::new(move |gpu, rng| {
            if !blas_present() {
                return Ok(NO_CUBLAS.into());
            }
            let st = gpu.stream();
            let shape = GemmShape {
                m,
                k,
                n,
                trans_a: ta,
                trans_b: tb,
            };
            let a = random(rng, m * k, 1.0);
            let b = random(rng, k * n, 1.0);
            let c0 = random(rng, m * n, 1.0);
            let bv = random(rng, n, 1.0);
            let want = cpu_gemm(&shape, &a, &b, beta, &c0, bias.then_some(&bv[..]));
            let pad = |v: &[f32]| {
                let mut p = vec![f32::NAN; offset];
                p.extend_from_slice(v);
                p
            };
            let a_d = st.clone_htod(&pad(&a)).map_err(drv)?;
            let b_d = st.clone_htod(&pad(&b)).map_err(drv)?;
            let bias_d = st.clone_htod(&pad(&bv)).map_err(drv)?;
            // beta == 0 must not read C: poison it then.
            let c_init = if beta == 0.0 {
                vec![f32::NAN; m * n]
            } else {
                c0.clone()
            };
            let mut c_d = st.clone_htod(&pad(&c_init)).map_err(drv)?;
            gpu.blas().map_err(cuda)?.set_mode(mode);
            let bias_view = bias_d.slice(offset..);
            let out = gpu.gemm(
                &shape,
                1.0,
                &a_d.slice(offset..),
                &b_d.slice(offset..),
                beta,
                &mut c_d.slice_mut(offset..),
                bias.then_some(&bias_view),
            );
            gpu.blas().map_err(cuda)?.set_mode(GemmImpl::Lt);
            out.map_err(cuda)?;
            let got = st.clone_dtoh(&c_d.slice(offset..)).map_err(drv)?;
            let e = check("C", &got, &want, FP32_TOL)?;
            let (fallbacks, why) = gpu.blas().map_err(cuda)?.lt_fallbacks();
            Ok(format!(
                "C {e:.1e} (shapes on classic cuBLAS so far: {fallbacks}{})",
                why.last()
                    .map(|w| format!("; last: {w}"))
                    .unwrap_or_default()
            ))
        }),
    }
}

/// bf16 operands, fp32 accumulation; f32 or bf16 output.
fn gemm_bf16_case(m: usize, k: usize, n: usize, bias: bool, bf16_out: bool) -> Case {
    Case {
        name: format!(
            "gemm bf16 {m}x{k}x{n}{}{}",
            if bias { " bias" } else { "" },
            if bf16_out { " ->bf16" } else { " ->f32" }
        ),
        run: Box::new(move |gpu, rng| {
            if !blas_present() {
                return Ok(NO_CUBLAS.into());
            }
            let st = gpu.stream();
            let shape = GemmShape::linear(m, k, n);
            let round = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
            let a = round(random(rng, m * k, 1.0));
            let b = round(random(rng, k * n, 1.0));
            let bv = round(random(rng, n, 1.0));
            let widen = |v: &[bf16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
            let want = cpu_gemm(
                &shape,
                &widen(&a),
                &widen(&b),
                0.0,
                &vec![0.0; m * n],
                bias.then_some(&widen(&bv)[..]),
            );
            let a_d = st.clone_htod(&a).map_err(drv)?;
            let b_d = st.clone_htod(&b).map_err(drv)?;
            let got = if bf16_out {
                let bias_d = st.clone_htod(&bv).map_err(drv)?;
                let mut c_d = st
                    .clone_htod(&vec![bf16::from_f32(f32::NAN); m * n])
                    .map_err(drv)?;
                let bias_view = bias_d.slice(..);
                gpu.gemm(
                    &shape,
                    1.0,
                    &a_d,
                    &b_d,
                    0.0,
                    &mut c_d.slice_mut(..),
                    bias.then_some(&bias_view),
                )
                .map_err(cuda)?;
                widen(&st.clone_dtoh(&c_d).map_err(drv)?)
            } else {
                let bias_d = st.clone_htod(&widen(&bv)).map_err(drv)?;
                let mut c_d = st.clone_htod(&vec![f32::NAN; m * n]).map_err(drv)?;
                let bias_view = bias_d.slice(..);
                gpu.gemm::<bf16, f32, _, _>(
                    &shape,
                    1.0,
                    &a_d,
                    &b_d,
                    0.0,
                    &mut c_d.slice_mut(..),
                    bias.then_some(&bias_view),
                )
                .map_err(cuda)?;
                st.clone_dtoh(&c_d).map_err(drv)?
            };
            // fp32 accumulation of exact bf16 products: only the output
            // rounding (bf16 out) and the summation order differ.
            let tol = if bf16_out { 1e-2 } else { 1e-5 };
            let e = check("C", &got, &want, tol)?;
            Ok(format!(
                "C {e:.1e} (plans cached: {})",
                gpu.blas().map_err(cuda)?.cached_plans()
            ))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    use GemmImpl::{Classic, Lt};
    use Trans::{No, Yes};
    vec![
        gemm_case(1, 1, 1, No, Yes, false, 0.0, 0, Lt),
        gemm_case(5, 7, 3, No, Yes, true, 0.0, 0, Lt),
        gemm_case(33, 65, 17, No, No, false, 0.0, 0, Lt),
        gemm_case(33, 65, 17, Yes, No, false, 1.0, 0, Lt),
        gemm_case(33, 65, 17, Yes, Yes, true, 0.5, 0, Lt),
        gemm_case(64, 1176, 32, No, Yes, false, 0.0, 0, Lt),
        gemm_case(257, 1280, 3840, No, Yes, true, 0.0, 0, Lt),
        gemm_case(24, 32, 32, No, Yes, true, 0.0, 1, Lt),
        gemm_case(5, 0, 3, No, Yes, true, 0.0, 0, Lt),
        gemm_case(33, 65, 17, No, Yes, true, 0.0, 0, Classic),
        gemm_case(33, 65, 17, Yes, No, false, 1.0, 3, Classic),
        gemm_bf16_case(64, 256, 96, true, false),
        gemm_bf16_case(65, 129, 33, false, false),
        gemm_bf16_case(64, 256, 96, true, true),
    ]
}
