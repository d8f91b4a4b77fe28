//! The f32/bf16 casts against `cpu::cast`, and bf16 storage through the
//! gather and rotary kernels.

use crate::{check, cuda, drv, random, to_bf16, widen, Case, BF16_TOL};
use half::bf16;
use rand::Rng;
use vppo_engine::backend::cpu;
use vppo_engine::backend::desc::RopeFreqs;

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
    vec![bf16_storage_case(1, 1, 128), bf16_storage_case(129, 4, 128)]
}
