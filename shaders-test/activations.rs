//! SwiGLU and GELU (f32 and bf16 storage) against `cpu::activations`.

use crate::{check, cuda, drv, random, to_bf16, widen, Case, BF16_TOL, FP32_TOL};
use half::bf16;
use vppo_engine::backend::cpu;

pub fn swiglu_case(n: usize) -> Case {
    Case {
        name: format!("swiglu fwd+bwd n={n}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let (gate, up, dh) = (
                random(rng, n, 8.0),
                random(rng, n, 2.0),
                random(rng, n, 1.0),
            );
            let mut h_ref = vec![0.0; n];
            cpu::activations::swiglu_fwd(&gate, &up, &mut h_ref);
            let (mut dg_ref, mut du_ref) = (vec![0.0; n], vec![0.0; n]);
            cpu::activations::swiglu_bwd(&dh, &gate, &up, &mut dg_ref, &mut du_ref);
            let up_d = |v: &[f32]| s.clone_htod(v).map_err(drv);
            let (g_d, u_d, dh_d) = (up_d(&gate)?, up_d(&up)?, up_d(&dh)?);
            let poison = vec![f32::NAN; n];
            let (mut h_d, mut dg_d, mut du_d) = (up_d(&poison)?, up_d(&poison)?, up_d(&poison)?);
            gpu.swiglu_fwd(&g_d, &u_d, n, &mut h_d).map_err(cuda)?;
            gpu.swiglu_bwd(&dh_d, &g_d, &u_d, n, &mut dg_d, &mut du_d)
                .map_err(cuda)?;
            let e_h = check("h", &s.clone_dtoh(&h_d).map_err(drv)?, &h_ref, FP32_TOL)?;
            let e_g = check(
                "dgate",
                &s.clone_dtoh(&dg_d).map_err(drv)?,
                &dg_ref,
                FP32_TOL,
            )?;
            let e_u = check("dup", &s.clone_dtoh(&du_d).map_err(drv)?, &du_ref, FP32_TOL)?;
            Ok(format!("h {e_h:.1e} dgate {e_g:.1e} dup {e_u:.1e}"))
        }),
    }
}

pub fn gelu_case(n: usize) -> Case {
    Case {
        name: format!("gelu fwd+bwd n={n}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let (x, dy) = (random(rng, n, 6.0), random(rng, n, 1.0));
            let (mut y_ref, mut dx_ref) = (vec![0.0; n], vec![0.0; n]);
            cpu::activations::gelu_fwd(&x, &mut y_ref);
            cpu::activations::gelu_bwd(&dy, &x, &mut dx_ref);
            let x_d = s.clone_htod(&x).map_err(drv)?;
            let dy_d = s.clone_htod(&dy).map_err(drv)?;
            let mut y_d = s.clone_htod(&vec![f32::NAN; n]).map_err(drv)?;
            let mut dx_d = s.clone_htod(&vec![f32::NAN; n]).map_err(drv)?;
            gpu.gelu_fwd(&x_d, n, &mut y_d).map_err(cuda)?;
            gpu.gelu_bwd(&dy_d, &x_d, n, &mut dx_d).map_err(cuda)?;
            let e_y = check("y", &s.clone_dtoh(&y_d).map_err(drv)?, &y_ref, FP32_TOL)?;
            let e_dx = check("dx", &s.clone_dtoh(&dx_d).map_err(drv)?, &dx_ref, FP32_TOL)?;
            Ok(format!("y {e_y:.1e} dx {e_dx:.1e}"))
        }),
    }
}

/// bf16 storage: inputs rounded to bf16; the twin widens, runs the f32 op and
/// rounds the result (`cpu::cast`), compared after widening.
pub fn bf16_activations_case(n: usize) -> Case {
    Case {
        name: format!("swiglu+gelu bf16 fwd+bwd n={n}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let (gate, up, dh) = (
                to_bf16(&random(rng, n, 8.0)),
                to_bf16(&random(rng, n, 2.0)),
                to_bf16(&random(rng, n, 1.0)),
            );
            let (gf, uf, df) = (widen(&gate), widen(&up), widen(&dh));
            let mut h = vec![0.0; n];
            cpu::activations::swiglu_fwd(&gf, &uf, &mut h);
            let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
            cpu::activations::swiglu_bwd(&df, &gf, &uf, &mut dg, &mut du);
            let (mut y, mut dx) = (vec![0.0; n], vec![0.0; n]);
            cpu::activations::gelu_fwd(&gf, &mut y);
            cpu::activations::gelu_bwd(&df, &gf, &mut dx);
            let want: Vec<Vec<f32>> = [h, dg, du, y, dx]
                .iter()
                .map(|v| widen(&to_bf16(v)))
                .collect();
            let up_d = |v: &[bf16]| s.clone_htod(v).map_err(drv);
            let (g_d, u_d, dh_d) = (up_d(&gate)?, up_d(&up)?, up_d(&dh)?);
            let poison = vec![bf16::NAN; n];
            let mut outs = Vec::new();
            for _ in 0..5 {
                outs.push(up_d(&poison)?);
            }
            let [h_d, dg_d, du_d, y_d, dx_d] = &mut outs[..] else {
                unreachable!()
            };
            gpu.swiglu_fwd(&g_d, &u_d, n, h_d).map_err(cuda)?;
            gpu.swiglu_bwd(&dh_d, &g_d, &u_d, n, dg_d, du_d)
                .map_err(cuda)?;
            gpu.gelu_fwd(&g_d, n, y_d).map_err(cuda)?;
            gpu.gelu_bwd(&dh_d, &g_d, n, dx_d).map_err(cuda)?;
            let mut worst = 0.0f64;
            for (what, (d, w)) in ["h", "dgate", "dup", "gelu y", "gelu dx"]
                .iter()
                .zip(outs.iter().zip(&want))
            {
                let got = widen(&s.clone_dtoh(d).map_err(drv)?);
                worst = worst.max(check(what, &got, w, BF16_TOL)?);
            }
            Ok(format!("worst rel err {worst:.1e}"))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        swiglu_case(1),
        swiglu_case(1_000_003),
        gelu_case(1),
        gelu_case(777_777),
    ]
}

pub fn bf16_cases() -> Vec<Case> {
    vec![bf16_activations_case(1), bf16_activations_case(300_001)]
}
