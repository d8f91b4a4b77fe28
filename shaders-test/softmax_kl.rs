//! Softmax-KL and the k3 dependency against `cpu::softmax_kl`.

use crate::{check, check_truth, cuda, drv, random, to_f64, Case, FP32_TOL};
use vppo_engine::backend::cpu;

fn softmax_kl_case(rows: usize, vocab: usize, masked: bool) -> Case {
    Case {
        name: format!(
            "softmax_kl rows={rows} vocab={vocab}{}",
            if masked { " masked" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let mut zp = random(rng, rows * vocab, 8.0);
            let mut zq = random(rng, rows * vocab, 8.0);
            if masked {
                // Every third token impossible under both distributions.
                for i in (0..rows * vocab).step_by(3) {
                    zp[i] = f32::NEG_INFINITY;
                    zq[i] = f32::NEG_INFINITY;
                }
            }
            let (mut kl_ref, mut lp_ref, mut lq_ref) =
                (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
            cpu::softmax_kl::softmax_kl_fwd(&zp, &zq, vocab, &mut kl_ref, &mut lp_ref, &mut lq_ref);
            let (zp_d, zq_d) = (
                s.clone_htod(&zp).map_err(drv)?,
                s.clone_htod(&zq).map_err(drv)?,
            );
            let poison = vec![f32::NAN; rows];
            let mut kl_d = s.clone_htod(&poison).map_err(drv)?;
            let mut lp_d = s.clone_htod(&poison).map_err(drv)?;
            let mut lq_d = s.clone_htod(&poison).map_err(drv)?;
            gpu.softmax_kl_fwd(&zp_d, &zq_d, rows, vocab, &mut kl_d, &mut lp_d, &mut lq_d)
                .map_err(cuda)?;
            // KL is a sum over the vocabulary: judged against the f64 twin.
            let (mut kl64, mut lp64, mut lq64) =
                (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
            cpu::softmax_kl::softmax_kl_fwd(
                &to_f64(&zp),
                &to_f64(&zq),
                vocab,
                &mut kl64,
                &mut lp64,
                &mut lq64,
            );
            let kl = s.clone_dtoh(&kl_d).map_err(drv)?;
            let abs_err = check_truth("kl", &kl, &kl_ref, &kl64)?;
            let e_lp = check(
                "lse_p",
                &s.clone_dtoh(&lp_d).map_err(drv)?,
                &lp_ref,
                FP32_TOL,
            )?;
            let e_lq = check(
                "lse_q",
                &s.clone_dtoh(&lq_d).map_err(drv)?,
                &lq_ref,
                FP32_TOL,
            )?;
            Ok(format!(
                "kl {abs_err:.1e} lse_p {e_lp:.1e} lse_q {e_lq:.1e}"
            ))
        }),
    }
}

fn k3_case(n: usize) -> Case {
    Case {
        name: format!("dependency_k3 n={n}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let a = random(rng, n, 30.0);
            let b = random(rng, n, 30.0);
            let mut want = vec![0.0; n];
            cpu::softmax_kl::dependency_k3(&a, &b, &mut want);
            let (a_d, b_d) = (
                s.clone_htod(&a).map_err(drv)?,
                s.clone_htod(&b).map_err(drv)?,
            );
            let mut out = s.clone_htod(&vec![f32::NAN; n]).map_err(drv)?;
            gpu.dependency_k3(&a_d, &b_d, n, &mut out).map_err(cuda)?;
            let e = check("score", &s.clone_dtoh(&out).map_err(drv)?, &want, FP32_TOL)?;
            Ok(format!("score {e:.1e}"))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        softmax_kl_case(1, 1, false),
        softmax_kl_case(3, 100, false),
        softmax_kl_case(4, 1000, true),
        softmax_kl_case(7, 151_936, false),
        k3_case(1),
        k3_case(100_003),
    ]
}
