//! Flash attention (forward + backward, f32 and bf16 storage) against
//! `cpu::flash_attn`.

use crate::{check, check_truth, cuda, drv, random, to_f64, Case, BF16_TOL, FP32_TOL};
use half::bf16;
use vppo_engine::backend::cpu;
use vppo_engine::backend::cpu::flash_attn::VarlenAttention;
use vppo_engine::backend::cuda::FlashAttnShape;

/// Like `check`, for log-sum-exps: infinities must agree exactly (a query
/// that sees no key has lse = -inf), the finite values within `tol`.
fn check_lse(gpu: &[f32], cpu: &[f32], tol: f64) -> Result<f64, String> {
    if gpu.len() != cpu.len() {
        return Err("lse: length differs".into());
    }
    if let Some(i) = (0..cpu.len()).find(|&i| cpu[i].is_finite() != gpu[i].is_finite()) {
        return Err(format!("lse[{i}]: gpu {} cpu {}", gpu[i], cpu[i]));
    }
    if let Some(i) = (0..cpu.len()).find(|&i| !cpu[i].is_finite() && gpu[i] != cpu[i]) {
        return Err(format!("lse[{i}]: gpu {} cpu {}", gpu[i], cpu[i]));
    }
    let keep = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .zip(cpu)
            .filter(|(_, c)| c.is_finite())
            .map(|(g, _)| *g)
            .collect()
    };
    check("lse", &keep(gpu), &keep(cpu), tol)
}

/// `cu_seqlens` of sequences of `lens`.
pub(crate) fn offsets(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

/// `q_lens[s]` queries against `k_lens[s]` keys per sequence.
pub fn flash_case(
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Case {
    Case {
        name: format!(
            "flash_attn fwd+bwd q={q_lens:?} k={k_lens:?} h={q_heads}/{kv_heads} d={head_dim}{}",
            if causal { " causal" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let (cu_q, cu_k) = (offsets(&q_lens), offsets(&k_lens));
            let cfg = VarlenAttention {
                cu_seqlens_q: &cu_q,
                cu_seqlens_k: &cu_k,
                q_heads,
                kv_heads,
                head_dim,
                causal,
                scale: 1.0 / (head_dim as f64).sqrt(),
            };
            let (tq, tk): (usize, usize) = (q_lens.iter().sum(), k_lens.iter().sum());
            let (nq, nk) = (tq * q_heads * head_dim, tk * kv_heads * head_dim);
            let q = random(rng, nq, 2.0);
            let k = random(rng, nk, 2.0);
            let v = random(rng, nk, 1.0);
            let dout = random(rng, nq, 1.0);
            let mut o_ref = vec![0.0; nq];
            let mut lse_ref = vec![0.0; tq * q_heads];
            cpu::flash_attn::attention_fwd(&cfg, &q, &k, &v, &mut o_ref, &mut lse_ref)
                .map_err(|e| e.to_string())?;
            let (mut dq_ref, mut dk_ref, mut dv_ref) =
                (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            cpu::flash_attn::attention_bwd(
                &cfg,
                &q,
                &k,
                &v,
                &o_ref,
                &lse_ref,
                &dout,
                &mut dq_ref,
                &mut dk_ref,
                &mut dv_ref,
            )
            .map_err(|e| e.to_string())?;
            // dq with a single key is exactly 0 (softmax = 1): judged against f64.
            let (q64, k64, v64) = (to_f64(&q), to_f64(&k), to_f64(&v));
            let (mut o64, mut lse64) = (vec![0.0; nq], vec![0.0; tq * q_heads]);
            cpu::flash_attn::attention_fwd(&cfg, &q64, &k64, &v64, &mut o64, &mut lse64)
                .map_err(|e| e.to_string())?;
            let (mut dq64, mut dk64, mut dv64) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            cpu::flash_attn::attention_bwd(
                &cfg,
                &q64,
                &k64,
                &v64,
                &o64,
                &lse64,
                &to_f64(&dout),
                &mut dq64,
                &mut dk64,
                &mut dv64,
            )
            .map_err(|e| e.to_string())?;

            let shape = FlashAttnShape::of(&cfg).map_err(cuda)?;
            let up = |x: &[f32]| s.clone_htod(x).map_err(drv);
            let poison = |n: usize| s.clone_htod(&vec![f32::NAN; n.max(1)]).map_err(drv);
            let (q_d, k_d, v_d, do_d) = (up(&q)?, up(&k)?, up(&v)?, up(&dout)?);
            let cu_q_d = s.clone_htod(&cu_q).map_err(drv)?;
            let cu_k_d = s.clone_htod(&cu_k).map_err(drv)?;
            let (mut o_d, mut lse_d) = (poison(nq)?, poison(tq * q_heads)?);
            gpu.flash_attn_fwd(
                &shape, &q_d, &k_d, &v_d, &cu_q_d, &cu_k_d, &mut o_d, &mut lse_d,
            )
            .map_err(cuda)?;
            let (mut dq_d, mut dk_d, mut dv_d) = (poison(nq)?, poison(nk)?, poison(nk)?);
            let mut delta_d = poison(tq * q_heads)?;
            gpu.flash_attn_bwd(
                &shape,
                &q_d,
                &k_d,
                &v_d,
                &o_d,
                &lse_d,
                &do_d,
                &cu_q_d,
                &cu_k_d,
                &mut delta_d,
                &mut dq_d,
                &mut dk_d,
                &mut dv_d,
            )
            .map_err(cuda)?;
            let down = |x: &cudarc::driver::CudaSlice<f32>, n: usize| -> Result<Vec<f32>, String> {
                let mut v = s.clone_dtoh(x).map_err(drv)?;
                v.truncate(n);
                Ok(v)
            };
            let e_o = check("o", &down(&o_d, nq)?, &o_ref, FP32_TOL)?;
            let e_l = check_lse(&down(&lse_d, tq * q_heads)?, &lse_ref, FP32_TOL)?;
            let e_dq = check_truth("dq", &down(&dq_d, nq)?, &dq_ref, &dq64)?;
            let e_dk = check_truth("dk", &down(&dk_d, nk)?, &dk_ref, &dk64)?;
            let e_dv = check_truth("dv", &down(&dv_d, nk)?, &dv_ref, &dv64)?;
            Ok(format!(
                "o {e_o:.1e} lse {e_l:.1e} dq {e_dq:.1e} dk {e_dk:.1e} dv {e_dv:.1e}"
            ))
        }),
    }
}

/// bf16 storage (f32 arithmetic): inputs rounded to bf16, the CPU op on the
/// widened inputs as reference, relative error below 1e-2 (lse below 1e-5).
pub fn flash_bf16_case(
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Case {
    Case {
        name: format!(
            "flash_attn bf16 fwd+bwd q={q_lens:?} k={k_lens:?} h={q_heads}/{kv_heads} d={head_dim}{}",
            if causal { " causal" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let (cu_q, cu_k) = (offsets(&q_lens), offsets(&k_lens));
            let cfg = VarlenAttention {
                cu_seqlens_q: &cu_q,
                cu_seqlens_k: &cu_k,
                q_heads,
                kv_heads,
                head_dim,
                causal,
                scale: 1.0 / (head_dim as f64).sqrt(),
            };
            let (tq, tk): (usize, usize) = (q_lens.iter().sum(), k_lens.iter().sum());
            let (nq, nk) = (tq * q_heads * head_dim, tk * kv_heads * head_dim);
            let round = |v: Vec<f32>| -> Vec<bf16> {
                let mut out = vec![bf16::ZERO; v.len()];
                cpu::cast::f32_to_bf16(&v, &mut out);
                out
            };
            let widen = |v: &[bf16]| -> Vec<f32> { v.iter().map(|x| x.to_f32()).collect() };
            let q = round(random(rng, nq, 2.0));
            let k = round(random(rng, nk, 2.0));
            let v = round(random(rng, nk, 1.0));
            let dout = round(random(rng, nq, 1.0));
            let (qf, kf, vf, df) = (widen(&q), widen(&k), widen(&v), widen(&dout));
            let mut o_ref = vec![0.0; nq];
            let mut lse_ref = vec![0.0; tq * q_heads];
            cpu::flash_attn::attention_fwd(&cfg, &qf, &kf, &vf, &mut o_ref, &mut lse_ref)
                .map_err(|e| e.to_string())?;
            let (mut dq_ref, mut dk_ref, mut dv_ref) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            cpu::flash_attn::attention_bwd(
                &cfg,
                &qf,
                &kf,
                &vf,
                &o_ref,
                &lse_ref,
                &df,
                &mut dq_ref,
                &mut dk_ref,
                &mut dv_ref,
            )
            .map_err(|e| e.to_string())?;
            let shape = FlashAttnShape::of(&cfg).map_err(cuda)?;
            let up = |x: &[bf16]| s.clone_htod(x).map_err(drv);
            let poison = |n: usize| s.clone_htod(&vec![bf16::NAN; n.max(1)]).map_err(drv);
            let (q_d, k_d, v_d, do_d) = (up(&q)?, up(&k)?, up(&v)?, up(&dout)?);
            let cu_q_d = s.clone_htod(&cu_q).map_err(drv)?;
            let cu_k_d = s.clone_htod(&cu_k).map_err(drv)?;
            let mut o_d = poison(nq)?;
            let mut lse_d = s
                .clone_htod(&vec![f32::NAN; (tq * q_heads).max(1)])
                .map_err(drv)?;
            gpu.flash_attn_fwd(&shape, &q_d, &k_d, &v_d, &cu_q_d, &cu_k_d, &mut o_d, &mut lse_d)
                .map_err(cuda)?;
            let (mut dq_d, mut dk_d, mut dv_d) = (poison(nq)?, poison(nk)?, poison(nk)?);
            let mut delta_d = s
                .clone_htod(&vec![f32::NAN; (tq * q_heads).max(1)])
                .map_err(drv)?;
            gpu.flash_attn_bwd(
                &shape,
                &q_d,
                &k_d,
                &v_d,
                &o_d,
                &lse_d,
                &do_d,
                &cu_q_d,
                &cu_k_d,
                &mut delta_d,
                &mut dq_d,
                &mut dk_d,
                &mut dv_d,
            )
            .map_err(cuda)?;
            let down = |x: &cudarc::driver::CudaSlice<bf16>, n: usize| -> Result<Vec<f32>, String> {
                Ok(widen(&s.clone_dtoh(x).map_err(drv)?[..n]))
            };
            let mut lse = s.clone_dtoh(&lse_d).map_err(drv)?;
            lse.truncate(tq * q_heads);
            let e_o = check("o", &down(&o_d, nq)?, &o_ref, BF16_TOL)?;
            let e_l = check_lse(&lse, &lse_ref, FP32_TOL)?;
            let e_dq = check("dq", &down(&dq_d, nq)?, &dq_ref, BF16_TOL)?;
            let e_dk = check("dk", &down(&dk_d, nk)?, &dk_ref, BF16_TOL)?;
            let e_dv = check("dv", &down(&dv_d, nk)?, &dv_ref, BF16_TOL)?;
            Ok(format!(
                "o {e_o:.1e} lse {e_l:.1e} dq {e_dq:.1e} dk {e_dk:.1e} dv {e_dv:.1e}"
            ))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        // Vision: bidirectional, head_dim 80, windows and a full image.
        flash_case(vec![1], vec![1], 2, 2, 80, false),
        flash_case(vec![5, 64, 100, 31], vec![5, 64, 100, 31], 4, 4, 80, false),
        flash_case(vec![300], vec![300], 2, 2, 80, false),
        // Text: causal GQA, head_dim 128.
        flash_case(vec![1, 33, 130], vec![1, 33, 130], 8, 2, 128, true),
        flash_case(vec![97], vec![97], 4, 4, 128, true),
        flash_case(vec![70, 0, 45], vec![70, 0, 45], 6, 1, 128, true),
        // Fewer queries than keys (ends aligned), and more (rows that see nothing).
        flash_case(vec![3, 40], vec![8, 77], 4, 2, 128, true),
        flash_case(vec![50, 9], vec![20, 3], 4, 2, 128, true),
        flash_case(vec![7, 40], vec![33, 2], 2, 1, 80, false),
        // Small head dims (test-size models: the fixtures use 16).
        flash_case(vec![64, 48], vec![64, 48], 2, 2, 16, false),
        flash_case(vec![93], vec![93], 4, 2, 16, true),
        flash_case(vec![1, 70], vec![1, 70], 8, 8, 64, true),
    ]
}

pub fn bf16_cases() -> Vec<Case> {
    vec![
        flash_bf16_case(vec![5, 64, 100], vec![5, 64, 100], 4, 4, 80, false),
        flash_bf16_case(vec![1, 33, 130], vec![1, 33, 130], 8, 2, 128, true),
        flash_bf16_case(vec![50, 9], vec![20, 3], 4, 2, 128, true),
        flash_bf16_case(vec![93], vec![93], 4, 2, 16, true),
    ]
}
