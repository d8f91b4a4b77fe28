//! Tensor-core paged decode attention (`kernels/paged_attn_tc.cu`, bf16,
//! split KV walk + combine) against the CPU twin on the bf16-rounded inputs
//! (bf16 tolerance) and against the fp32 CUDA-core kernel on the same
//! widened inputs.

use crate::paged_attn::shuffled_tables;
use crate::{check, cuda, drv, random, to_bf16, widen, Case, BF16_TOL};
use half::bf16;
use vppo_engine::backend::cpu;
use vppo_engine::backend::cpu::paged_attn::{PagedSeq, PagedShape};
use vppo_engine::backend::cuda::{paged_tc_plan, paged_tc_scratch_len};
use vppo_engine::backend::desc::flatten_block_tables;

pub fn tc_case(
    lens: Vec<usize>,
    block_size: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Case {
    Case {
        name: format!(
            "paged_attn_tc lens={lens:?} bs={block_size} h={q_heads}/{kv_heads} d={head_dim}"
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
            let nq = lens.len() * q_heads * head_dim;
            let k_cache = to_bf16(&random(rng, cache_len, 2.0));
            let v_cache = to_bf16(&random(rng, cache_len, 1.0));
            let q = to_bf16(&random(rng, nq, 2.0));
            let (kf, vf, qf) = (widen(&k_cache), widen(&v_cache), widen(&q));
            let mut want = vec![0.0; nq];
            cpu::paged_attn::paged_decode_attention(&shape, &qf, &kf, &vf, &seqs, &mut want);

            let (tab, seq_lens, stride) = flatten_block_tables(&seqs);
            let tab_d = s.clone_htod(&tab).map_err(drv)?;
            let lens_d = s.clone_htod(&seq_lens).map_err(drv)?;
            let batch = lens.len();
            let max_len = lens.iter().copied().max().unwrap_or(0);
            let plan = paged_tc_plan(batch, kv_heads, max_len);
            let q_d = s.clone_htod(&q).map_err(drv)?;
            let k_d = s.clone_htod(&k_cache).map_err(drv)?;
            let v_d = s.clone_htod(&v_cache).map_err(drv)?;
            let mut o_d = s.clone_htod(&vec![bf16::NAN; nq.max(1)]).map_err(drv)?;
            let mut scratch = s
                .clone_htod(&vec![
                    f32::NAN;
                    paged_tc_scratch_len(&shape, batch, &plan).max(1)
                ])
                .map_err(drv)?;
            gpu.paged_decode_attention_tc(
                &shape,
                batch,
                max_len,
                &q_d,
                &k_d,
                &v_d,
                &tab_d,
                stride,
                &lens_d,
                &mut scratch,
                &mut o_d,
            )
            .map_err(cuda)?;
            let got = widen(&s.clone_dtoh(&o_d).map_err(drv)?[..nq]);

            // The fp32 kernel on the widened values.
            let qf_d = s.clone_htod(&qf).map_err(drv)?;
            let kf_d = s.clone_htod(&kf).map_err(drv)?;
            let vf_d = s.clone_htod(&vf).map_err(drv)?;
            let mut o32_d = s.clone_htod(&vec![f32::NAN; nq.max(1)]).map_err(drv)?;
            gpu.paged_decode_attention(
                &shape, batch, &qf_d, &kf_d, &vf_d, &tab_d, stride, &lens_d, &mut o32_d,
            )
            .map_err(cuda)?;
            let mut o32 = s.clone_dtoh(&o32_d).map_err(drv)?;
            o32.truncate(nq);

            let e = check("o vs cpu", &got, &want, BF16_TOL)?;
            let e32 = check("o vs fp32 kernel", &got, &o32, BF16_TOL)?;
            Ok(format!(
                "o {e:.1e} (fp32 kernel {e32:.1e}), {} split(s) of {} tokens",
                plan.splits, plan.split_tokens
            ))
        }),
    }
}

/// The decode case at test size (28/4 heads, d = 128, 16-token
/// blocks: several splits per sequence), length 1, an empty sequence, odd
/// lengths, a block size other than 16, the vision and small head dims, and
/// a group of 16 heads (the whole MMA tile).
pub fn cases() -> Vec<Case> {
    vec![
        tc_case(vec![1], 16, 28, 4, 128),
        tc_case(vec![33, 129, 0, 1000], 16, 28, 4, 128),
        tc_case(vec![4099], 16, 28, 4, 128),
        tc_case(vec![17, 300, 64], 32, 8, 2, 80),
        tc_case(vec![5, 77], 16, 16, 1, 64),
        tc_case(vec![93, 2], 16, 4, 2, 16),
    ]
}
