//! Paged decode attention against `cpu::paged_attn`.

use crate::{check, cuda, drv, random, Case, BF16_TOL, FP32_TOL};
use half::bf16;
use rand::rngs::StdRng;
use rand::Rng;
use vppo_engine::backend::cpu;
use vppo_engine::backend::cpu::paged_attn::{PagedSeq, PagedShape};
use vppo_engine::backend::desc::flatten_block_tables;

pub fn paged_case(
    lens: Vec<usize>,
    block_size: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Case {
    paged_case_typed(lens, block_size, q_heads, kv_heads, head_dim, false)
}

/// With `bf16`, q and the caches are rounded to bf16 and the kernel runs on
/// bf16 storage; the reference is the CPU op on the widened values.
pub fn paged_case_typed(
    lens: Vec<usize>,
    block_size: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    bf16_storage: bool,
) -> Case {
    Case {
        name: format!(
            "paged_decode{} lens={lens:?} bs={block_size} h={q_heads}/{kv_heads} d={head_dim}",
            if bf16_storage { " bf16" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let (tables, n_blocks) = shuffled_tables(rng, &lens, block_size);
            let seqs: Vec<PagedSeq> = tables
                .iter()
                .zip(&lens)
                .map(|(t, &len)| PagedSeq {
                    block_table: t,
                    len,
                })
                .collect();
            let shape = PagedShape {
                block_size,
                q_heads,
                kv_heads,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            let cache_len = n_blocks * block_size * kv_heads * head_dim;
            // bf16 storage: values already on the bf16 grid.
            let grid = |v: Vec<f32>| -> Vec<f32> {
                if bf16_storage {
                    v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect()
                } else {
                    v
                }
            };
            let k_cache = grid(random(rng, cache_len, 2.0));
            let v_cache = grid(random(rng, cache_len, 1.0));
            let nq = lens.len() * q_heads * head_dim;
            let q = grid(random(rng, nq, 2.0));
            let mut want = vec![0.0; nq];
            cpu::paged_attn::paged_decode_attention(
                &shape, &q, &k_cache, &v_cache, &seqs, &mut want,
            );
            let (tab, seq_lens, stride) = flatten_block_tables(&seqs);
            let tab_d = s.clone_htod(&tab).map_err(drv)?;
            let lens_d = s.clone_htod(&seq_lens).map_err(drv)?;
            let got: Vec<f32> = if bf16_storage {
                let b = |v: &[f32]| -> Vec<bf16> { v.iter().map(|x| bf16::from_f32(*x)).collect() };
                let q_d = s.clone_htod(&b(&q)).map_err(drv)?;
                let k_d = s.clone_htod(&b(&k_cache)).map_err(drv)?;
                let v_d = s.clone_htod(&b(&v_cache)).map_err(drv)?;
                let mut o_d = s.clone_htod(&vec![bf16::NAN; nq]).map_err(drv)?;
                gpu.paged_decode_attention(
                    &shape,
                    lens.len(),
                    &q_d,
                    &k_d,
                    &v_d,
                    &tab_d,
                    stride,
                    &lens_d,
                    &mut o_d,
                )
                .map_err(cuda)?;
                let o = s.clone_dtoh(&o_d).map_err(drv)?;
                o.iter().map(|x| x.to_f32()).collect()
            } else {
                let q_d = s.clone_htod(&q).map_err(drv)?;
                let k_d = s.clone_htod(&k_cache).map_err(drv)?;
                let v_d = s.clone_htod(&v_cache).map_err(drv)?;
                let mut o_d = s.clone_htod(&vec![f32::NAN; nq]).map_err(drv)?;
                gpu.paged_decode_attention(
                    &shape,
                    lens.len(),
                    &q_d,
                    &k_d,
                    &v_d,
                    &tab_d,
                    stride,
                    &lens_d,
                    &mut o_d,
                )
                .map_err(cuda)?;
                s.clone_dtoh(&o_d).map_err(drv)?
            };
            let tol = if bf16_storage { BF16_TOL } else { FP32_TOL };
            let e = check("o", &got, &want, tol)?;
            Ok(format!("o {e:.1e}"))
        }),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        paged_case(vec![1], 16, 2, 2, 128),
        paged_case(vec![17, 0, 300, 64], 16, 8, 2, 128),
        paged_case(vec![5, 1000], 32, 4, 4, 80),
        paged_case(vec![33, 129], 16, 28, 4, 128),
    ]
}

pub fn bf16_cases() -> Vec<Case> {
    vec![paged_case_typed(vec![17, 0, 300], 16, 8, 2, 128, true)]
}

/// Block tables for sequences of `lens`: blocks handed out in a shuffled
/// order, with 3 unused ones; and the cache's block count.
pub(crate) fn shuffled_tables(
    rng: &mut StdRng,
    lens: &[usize],
    block_size: usize,
) -> (Vec<Vec<usize>>, usize) {
    let needed: usize = lens.iter().map(|l| l.div_ceil(block_size)).sum();
    let n_blocks = needed + 3;
    let mut free: Vec<usize> = (0..n_blocks).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.random_range(0..=i));
    }
    let tables = lens
        .iter()
        .map(|l| {
            (0..l.div_ceil(block_size))
                .map(|_| free.pop().unwrap())
                .collect()
        })
        .collect();
    (tables, n_blocks)
}
