//! Rotary embedding (1D, M-RoPE, vision 2D) against `cpu::rope`.

use crate::{check, cuda, drv, random, Case, FP32_TOL};
use rand::Rng;
use vppo_engine::backend::cpu;
use vppo_engine::backend::desc::RopeFreqs;

#[derive(Clone, Copy, Debug)]
pub enum RopeKind {
    Text1d,
    Mrope,
    Vision2d,
}

pub fn rope_case(kind: RopeKind, tokens: usize, heads: usize, head_dim: usize) -> Case {
    Case {
        name: format!("rope {kind:?} fwd+bwd tokens={tokens} heads={heads} d={head_dim}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let (freqs, streams) = match kind {
                RopeKind::Text1d => (RopeFreqs::text_1d(head_dim, 1e6), 1),
                RopeKind::Mrope => {
                    let half = head_dim / 2;
                    let t = half / 4;
                    let h = (half - t) / 2;
                    (RopeFreqs::mrope([t, h, half - t - h], head_dim, 1e6), 3)
                }
                RopeKind::Vision2d => (RopeFreqs::vision_2d(head_dim, 1e4), 2),
            };
            // Positions up to ~32k (long contexts): large angles.
            let pos: Vec<Vec<i32>> = (0..streams)
                .map(|_| (0..tokens).map(|_| rng.random_range(0..32_768)).collect())
                .collect();
            let views: Vec<&[i32]> = pos.iter().map(|p| p.as_slice()).collect();
            let table = freqs.table(&views);
            let n = tokens * heads * head_dim;
            let x = random(rng, n, 2.0);
            let (mut y_ref, mut dx_ref) = (vec![0.0; n], vec![0.0; n]);
            cpu::rope::rope_fwd(&table, &x, heads, &mut y_ref);
            cpu::rope::rope_bwd(&table, &x, heads, &mut dx_ref);
            let flat: Vec<i32> = pos.concat();
            let plan = gpu.rope_freqs(&freqs).map_err(cuda)?;
            let pos_d = s.clone_htod(&flat).map_err(drv)?;
            let x_d = s.clone_htod(&x).map_err(drv)?;
            let mut y_d = s.clone_htod(&vec![f32::NAN; n]).map_err(drv)?;
            let mut dx_d = s.clone_htod(&vec![f32::NAN; n]).map_err(drv)?;
            gpu.rope(&plan, &pos_d, tokens, heads, false, &x_d, &mut y_d)
                .map_err(cuda)?;
            gpu.rope(&plan, &pos_d, tokens, heads, true, &x_d, &mut dx_d)
                .map_err(cuda)?;
            let e_y = check("y", &s.clone_dtoh(&y_d).map_err(drv)?, &y_ref, FP32_TOL)?;
            let e_dx = check("dx", &s.clone_dtoh(&dx_d).map_err(drv)?, &dx_ref, FP32_TOL)?;
            Ok(format!("y {e_y:.1e} dx {e_dx:.1e}"))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        rope_case(RopeKind::Text1d, 1, 1, 128),
        rope_case(RopeKind::Text1d, 333, 4, 128),
        rope_case(RopeKind::Mrope, 257, 7, 128),
        rope_case(RopeKind::Vision2d, 1, 16, 80),
        rope_case(RopeKind::Vision2d, 1031, 16, 80),
    ]
}
