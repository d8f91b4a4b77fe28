//! The embedding gather / scatter-add against `cpu::embedding`.

use crate::{cuda, drv, random, Case};
use rand::Rng;
use vppo_engine::backend::cpu;

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
        embedding_case(1, 1, 1),
        embedding_case(1000, 37, 130),
        embedding_case(4099, 151_936, 64),
    ]
}
