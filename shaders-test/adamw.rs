//! Multi-tensor AdamW and the global gradient norm against `cpu::adamw`.

use crate::{cuda, drv, random, Case};
use half::bf16;
use vppo_engine::backend::cpu;
use vppo_engine::backend::cpu::adamw::AdamWConfig;
use vppo_engine::backend::cuda::AdamWTensor;
use vppo_engine::backend::desc::clip_coefficient;

/// Several steps on tensors of the given sizes (each with a bf16 model copy
/// when `with_model`), clipping to `max_norm` as the trainer does: the
/// masters, moments and model copies must be bit-identical to the CPU's, the
/// norms within 1e-9 relative.
pub fn adamw_case(lens: Vec<usize>, steps: u64, max_norm: f64, with_model: bool) -> Case {
    Case {
        name: format!(
            "adamw multi-tensor lens={lens:?} steps={steps} clip={max_norm}{}",
            if with_model { " +bf16" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let cfg = AdamWConfig {
                lr: 1e-3,
                weight_decay: 0.1,
                ..AdamWConfig::default()
            };
            let mut p_ref: Vec<Vec<f32>> = lens.iter().map(|&n| random(rng, n, 1.0)).collect();
            let mut m_ref: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
            let mut v_ref = m_ref.clone();
            let mut w_ref: Vec<Vec<bf16>> = lens.iter().map(|&n| vec![bf16::ZERO; n]).collect();
            let up = |v: &[f32]| s.clone_htod(v).map_err(drv);
            let mut p_d = p_ref.iter().map(|v| up(v)).collect::<Result<Vec<_>, _>>()?;
            let mut m_d = m_ref.iter().map(|v| up(v)).collect::<Result<Vec<_>, _>>()?;
            let mut v_d = v_ref.iter().map(|v| up(v)).collect::<Result<Vec<_>, _>>()?;
            let mut w_d = w_ref
                .iter()
                .map(|v| s.clone_htod(v).map_err(drv))
                .collect::<Result<Vec<_>, _>>()?;
            let mut worst_norm = 0.0f64;
            for step in 1..=steps {
                let mut g_ref: Vec<Vec<f32>> = lens.iter().map(|&n| random(rng, n, 0.5)).collect();
                let g_d = g_ref.iter().map(|v| up(v)).collect::<Result<Vec<_>, _>>()?;
                let norm_d = gpu
                    .global_grad_norm(&g_d.iter().collect::<Vec<_>>())
                    .map_err(cuda)?;
                let mut views: Vec<&mut [f32]> =
                    g_ref.iter_mut().map(|g| g.as_mut_slice()).collect();
                let norm = cpu::adamw::clip_grad_norm(&mut views, max_norm);
                let rel = (norm_d - norm).abs() / norm.max(1e-30);
                worst_norm = worst_norm.max(rel);
                if rel.is_nan() || rel > 1e-9 {
                    return Err(format!("step {step}: norm gpu {norm_d} cpu {norm}"));
                }
                for i in 0..lens.len() {
                    cpu::adamw::adamw_step(
                        &cfg,
                        step,
                        &mut p_ref[i],
                        &g_ref[i],
                        &mut m_ref[i],
                        &mut v_ref[i],
                        with_model.then_some(&mut w_ref[i][..]),
                    );
                }
                let coef = clip_coefficient(norm_d, max_norm);
                let mut tensors: Vec<AdamWTensor> = p_d
                    .iter_mut()
                    .zip(&g_d)
                    .zip(m_d.iter_mut().zip(v_d.iter_mut()))
                    .zip(w_d.iter_mut())
                    .map(|(((param, grad), (exp_avg, exp_avg_sq)), w)| AdamWTensor {
                        param,
                        grad,
                        exp_avg,
                        exp_avg_sq,
                        model: with_model.then_some(w),
                    })
                    .collect();
                gpu.adamw_step(&cfg, step, coef, &mut tensors)
                    .map_err(cuda)?;
            }
            let bits =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            for i in 0..lens.len() {
                for (what, d, r) in [
                    ("param", &p_d[i], &p_ref[i]),
                    ("exp_avg", &m_d[i], &m_ref[i]),
                    ("exp_avg_sq", &v_d[i], &v_ref[i]),
                ] {
                    if !bits(&s.clone_dtoh(d).map_err(drv)?, r) {
                        return Err(format!("tensor {i}: {what} not bit-identical"));
                    }
                }
                if with_model && s.clone_dtoh(&w_d[i]).map_err(drv)? != w_ref[i] {
                    return Err(format!("tensor {i}: bf16 model copy differs"));
                }
            }
            Ok(format!("bit-exact; norm rel err {worst_norm:.1e}"))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        adamw_case(vec![1], 1, 1.0, false),
        adamw_case(vec![3, 16_384, 16_385, 100_000, 7], 3, 1.0, true),
        adamw_case(vec![1_000_000, 5], 2, 1e9, true),
    ]
}
