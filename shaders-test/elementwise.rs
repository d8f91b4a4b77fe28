//! Rotary embedding (1D, M-RoPE, vision 2D), SwiGLU, GELU and the embedding
//! gather / scatter-add against their CPU twins.

use crate::{check, cuda, drv, random, Case, FP32_TOL};
use half::bf16;
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

/// Gather, then scatter-add with many repeated ids; the backward must be
/// bit-identical to the CPU's.
pub fn embedding_case(tokens: usize, vocab: usize, dim: usize) -> Case {
    Case {
        name: format!("embedding fwd+bwd tokens={tokens} vocab={vocab} dim={dim}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let table = random(rng, vocab * dim, 1.0);
            // Skewed ids: a few hot tokens repeat often.
            let ids: Vec<u32> = (0..tokens)
                .map(|_| {
                    if rng.random_bool(0.5) {
                        rng.random_range(0..4.min(vocab) as u32)
                    } else {
                        rng.random_range(0..vocab as u32)
                    }
                })
                .collect();
            let dout = random(rng, tokens * dim, 1.0);
            let dtable0 = random(rng, vocab * dim, 1.0);
            let mut out_ref = vec![0.0; tokens * dim];
            cpu::embedding::embedding_fwd(&ids, &table, dim, &mut out_ref)
                .map_err(|e| e.to_string())?;
            let mut dtable_ref = dtable0.clone();
            cpu::embedding::embedding_bwd(&ids, &dout, dim, &mut dtable_ref)
                .map_err(|e| e.to_string())?;
            let ids_d = s.clone_htod(&ids).map_err(drv)?;
            let table_d = s.clone_htod(&table).map_err(drv)?;
            let dout_d = s.clone_htod(&dout).map_err(drv)?;
            let mut out_d = s
                .clone_htod(&vec![f32::NAN; (tokens * dim).max(1)])
                .map_err(drv)?;
            let mut dtable_d = s.clone_htod(&dtable0).map_err(drv)?;
            gpu.embedding_fwd(&ids_d, tokens, &table_d, vocab, dim, &mut out_d)
                .map_err(cuda)?;
            gpu.embedding_bwd(&ids, &dout_d, dim, &mut dtable_d)
                .map_err(cuda)?;
            let mut out = s.clone_dtoh(&out_d).map_err(drv)?;
            out.truncate(tokens * dim);
            if out != out_ref {
                return Err("gather differs from the CPU".into());
            }
            let dt = s.clone_dtoh(&dtable_d).map_err(drv)?;
            match dt
                .iter()
                .zip(&dtable_ref)
                .position(|(a, b)| a.to_bits() != b.to_bits())
            {
                None => Ok("gather and scatter-add bit-exact".into()),
                Some(i) => Err(format!("dtable[{i}]: gpu {} cpu {}", dt[i], dtable_ref[i])),
            }
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
        swiglu_case(1),
        swiglu_case(1_000_003),
        gelu_case(1),
        gelu_case(777_777),
        embedding_case(1, 1, 1),
        embedding_case(1000, 37, 130),
        embedding_case(4099, 151_936, 64),
    ]
}

const BF16_TOL: f64 = 1e-2;

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    cpu::cast::f32_to_bf16(v, &mut out);
    out
}

fn widen(v: &[bf16]) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    cpu::cast::bf16_to_f32(v, &mut out);
    out
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

/// Casts both ways and the bf16 gather and rotary kernels.
pub fn bf16_storage_case(tokens: usize, heads: usize, head_dim: usize) -> Case {
    Case {
        name: format!("cast+embedding+rope bf16 tokens={tokens} heads={heads} d={head_dim}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let n = tokens * heads * head_dim;
            // Casts: bit-exact (finite values).
            let x = random(rng, n, 3.0);
            let x_bf = to_bf16(&x);
            let x_d = s.clone_htod(&x).map_err(drv)?;
            let mut xb_d = s.clone_htod(&vec![bf16::NAN; n]).map_err(drv)?;
            gpu.cast_f32_to_bf16(&x_d, n, &mut xb_d).map_err(cuda)?;
            let got = s.clone_dtoh(&xb_d).map_err(drv)?;
            if got
                .iter()
                .zip(&x_bf)
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err("cast_f32_to_bf16 differs from half's rounding".into());
            }
            let mut back_d = s.clone_htod(&vec![f32::NAN; n]).map_err(drv)?;
            gpu.cast_bf16_to_f32(&xb_d, n, &mut back_d).map_err(cuda)?;
            if s.clone_dtoh(&back_d).map_err(drv)? != widen(&x_bf) {
                return Err("cast_bf16_to_f32 is not exact".into());
            }
            // Gather from a bf16 table: exact.
            let (vocab, dim) = (97, heads * head_dim);
            let table = to_bf16(&random(rng, vocab * dim, 1.0));
            let ids: Vec<u32> = (0..tokens)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect();
            let want: Vec<bf16> = ids
                .iter()
                .flat_map(|&i| table[i as usize * dim..(i as usize + 1) * dim].to_vec())
                .collect();
            let ids_d = s.clone_htod(&ids).map_err(drv)?;
            let table_d = s.clone_htod(&table).map_err(drv)?;
            let mut out_d = s.clone_htod(&vec![bf16::NAN; n]).map_err(drv)?;
            gpu.embedding_fwd(&ids_d, tokens, &table_d, vocab, dim, &mut out_d)
                .map_err(cuda)?;
            let got = s.clone_dtoh(&out_d).map_err(drv)?;
            if got
                .iter()
                .zip(&want)
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err("bf16 gather differs".into());
            }
            // Rotary on bf16 storage (M-RoPE plan).
            let half = head_dim / 2;
            let t = half / 4;
            let h = (half - t) / 2;
            let freqs = RopeFreqs::mrope([t, h, half - t - h], head_dim, 1e6);
            let pos: Vec<Vec<i32>> = (0..3)
                .map(|_| (0..tokens).map(|_| rng.random_range(0..4096)).collect())
                .collect();
            let views: Vec<&[i32]> = pos.iter().map(|p| p.as_slice()).collect();
            let mut y = vec![0.0; n];
            cpu::rope::rope_fwd(&freqs.table(&views), &widen(&x_bf), heads, &mut y);
            let want = widen(&to_bf16(&y));
            let plan = gpu.rope_freqs(&freqs).map_err(cuda)?;
            let pos_d = s.clone_htod(&pos.concat()).map_err(drv)?;
            let mut y_d = s.clone_htod(&vec![bf16::NAN; n]).map_err(drv)?;
            gpu.rope(&plan, &pos_d, tokens, heads, false, &xb_d, &mut y_d)
                .map_err(cuda)?;
            let e = check(
                "rope bf16",
                &widen(&s.clone_dtoh(&y_d).map_err(drv)?),
                &want,
                BF16_TOL,
            )?;
            Ok(format!("casts and gather bit-exact; rope {e:.1e}"))
        }),
    }
}

pub fn bf16_cases() -> Vec<Case> {
    vec![
        bf16_activations_case(1),
        bf16_activations_case(300_001),
        bf16_storage_case(1, 1, 128),
        bf16_storage_case(129, 4, 128),
    ]
}
