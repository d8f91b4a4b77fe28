//! RMSNorm forward and backward against `cpu::rmsnorm`.

use crate::{
    check, check_truth, cuda, drv, random, to_bf16, to_f64, widen, Case, BF16_TOL, FP32_TOL,
};
use half::bf16;
use vppo_engine::backend::cpu;

fn rmsnorm_case(rows: usize, dim: usize) -> Case {
    Case {
        name: format!("rmsnorm fwd+bwd rows={rows} dim={dim}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let x = random(rng, rows * dim, 3.0);
            let w = random(rng, dim, 1.0);
            let dy = random(rng, rows * dim, 1.0);
            let dw0 = random(rng, dim, 1.0);
            let eps = 1e-6f32;
            let (mut y_ref, mut rstd_ref) = (vec![0.0; rows * dim], vec![0.0; rows]);
            cpu::rmsnorm::rmsnorm_fwd(&x, &w, dim, eps, &mut y_ref, &mut rstd_ref);
            let mut dx_ref = vec![0.0; rows * dim];
            let mut dw_ref = dw0.clone();
            cpu::rmsnorm::rmsnorm_bwd(&dy, &x, &w, &rstd_ref, dim, &mut dx_ref, &mut dw_ref);
            let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));
            let (mut y64, mut rstd64) = (vec![0.0; rows * dim], vec![0.0; rows]);
            cpu::rmsnorm::rmsnorm_fwd(&x64, &w64, dim, eps as f64, &mut y64, &mut rstd64);
            let (mut dx64, mut dw64) = (vec![0.0; rows * dim], to_f64(&dw0));
            cpu::rmsnorm::rmsnorm_bwd(&dy64, &x64, &w64, &rstd64, dim, &mut dx64, &mut dw64);

            let (x_d, w_d, dy_d) = (
                s.clone_htod(&x).map_err(drv)?,
                s.clone_htod(&w).map_err(drv)?,
                s.clone_htod(&dy).map_err(drv)?,
            );
            let mut y_d = s.clone_htod(&vec![f32::NAN; rows * dim]).map_err(drv)?;
            let mut rstd_d = s.clone_htod(&vec![f32::NAN; rows]).map_err(drv)?;
            gpu.rmsnorm_fwd(&x_d, &w_d, rows, dim, eps, &mut y_d, &mut rstd_d)
                .map_err(cuda)?;
            let mut dx_d = s.clone_htod(&vec![f32::NAN; rows * dim]).map_err(drv)?;
            let mut dw_d = s.clone_htod(&dw0).map_err(drv)?;
            gpu.rmsnorm_bwd(&dy_d, &x_d, &w_d, &rstd_d, rows, dim, &mut dx_d, &mut dw_d)
                .map_err(cuda)?;
            let e_y = check("y", &s.clone_dtoh(&y_d).map_err(drv)?, &y_ref, FP32_TOL)?;
            let e_r = check(
                "rstd",
                &s.clone_dtoh(&rstd_d).map_err(drv)?,
                &rstd_ref,
                FP32_TOL,
            )?;
            let e_dx = check_truth("dx", &s.clone_dtoh(&dx_d).map_err(drv)?, &dx_ref, &dx64)?;
            let e_dw = check_truth("dw", &s.clone_dtoh(&dw_d).map_err(drv)?, &dw_ref, &dw64)?;
            Ok(format!(
                "y {e_y:.1e} rstd {e_r:.1e} dx {e_dx:.1e} dw {e_dw:.1e}"
            ))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        rmsnorm_case(1, 1),
        rmsnorm_case(3, 7),
        rmsnorm_case(65, 1280),
        rmsnorm_case(257, 3584),
        rmsnorm_case(33, 8192),
    ]
}

/// bf16 storage (x, weight, y, dy, dx bf16; rstd and dw f32): the twin
/// widens the bf16 inputs, runs the f32 op and rounds y and dx
/// (`ops::cpu_bf16`); rstd and dw are f32 results of the same inputs.
fn rmsnorm_bf16_case(rows: usize, dim: usize) -> Case {
    Case {
        name: format!("rmsnorm bf16 fwd+bwd rows={rows} dim={dim}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let (x, w, dy) = (
                to_bf16(&random(rng, rows * dim, 3.0)),
                to_bf16(&random(rng, dim, 1.0)),
                to_bf16(&random(rng, rows * dim, 1.0)),
            );
            let dw0 = random(rng, dim, 1.0);
            let eps = 1e-6f32;
            let (x32, w32, dy32) = (widen(&x), widen(&w), widen(&dy));
            let (mut y_ref, mut rstd_ref) = (vec![0.0; rows * dim], vec![0.0; rows]);
            cpu::rmsnorm::rmsnorm_fwd(&x32, &w32, dim, eps, &mut y_ref, &mut rstd_ref);
            let (mut dx_ref, mut dw_ref) = (vec![0.0; rows * dim], dw0.clone());
            cpu::rmsnorm::rmsnorm_bwd(&dy32, &x32, &w32, &rstd_ref, dim, &mut dx_ref, &mut dw_ref);
            let (y_ref, dx_ref) = (widen(&to_bf16(&y_ref)), widen(&to_bf16(&dx_ref)));

            let (x_d, w_d, dy_d) = (
                s.clone_htod(&x).map_err(drv)?,
                s.clone_htod(&w).map_err(drv)?,
                s.clone_htod(&dy).map_err(drv)?,
            );
            let mut y_d = s.clone_htod(&vec![bf16::NAN; rows * dim]).map_err(drv)?;
            let mut rstd_d = s.clone_htod(&vec![f32::NAN; rows]).map_err(drv)?;
            gpu.rmsnorm_fwd(&x_d, &w_d, rows, dim, eps, &mut y_d, &mut rstd_d)
                .map_err(cuda)?;
            let mut dx_d = s.clone_htod(&vec![bf16::NAN; rows * dim]).map_err(drv)?;
            let mut dw_d = s.clone_htod(&dw0).map_err(drv)?;
            gpu.rmsnorm_bwd(&dy_d, &x_d, &w_d, &rstd_d, rows, dim, &mut dx_d, &mut dw_d)
                .map_err(cuda)?;
            let y = widen(&s.clone_dtoh(&y_d).map_err(drv)?);
            let dx = widen(&s.clone_dtoh(&dx_d).map_err(drv)?);
            let e_y = check("y", &y, &y_ref, BF16_TOL)?;
            let e_r = check(
                "rstd",
                &s.clone_dtoh(&rstd_d).map_err(drv)?,
                &rstd_ref,
                FP32_TOL,
            )?;
            let e_dx = check("dx", &dx, &dx_ref, BF16_TOL)?;
            // dw sums rows in another order than the twin: f32 tolerance
            // relative to its size.
            let e_dw = check("dw", &s.clone_dtoh(&dw_d).map_err(drv)?, &dw_ref, 1e-4)?;
            Ok(format!(
                "y {e_y:.1e} rstd {e_r:.1e} dx {e_dx:.1e} dw {e_dw:.1e}"
            ))
        }),
    }
}

pub fn bf16_cases() -> Vec<Case> {
    vec![
        rmsnorm_bf16_case(1, 1),
        rmsnorm_bf16_case(65, 1280),
        rmsnorm_bf16_case(257, 3584),
    ]
}
