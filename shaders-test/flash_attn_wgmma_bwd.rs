//! The Hopper flash-attention backward (`kernels/flash_attn_wgmma_bwd.cu`:
//! TMA, warp specialisation, wgmma) against the CPU twin (the f32 op on the
//! bf16-rounded inputs, bf16 tolerance as the FA2 backward's cases) and
//! against the FA2 tensor-core backward on the same inputs (o and lse from
//! the FA2 forward). Only a compute capability 9.0 device runs it; other
//! devices report the case skipped. On a 9.0 device a missing kernel FAILS
//! (the dispatch would silently keep FA2 there).

use crate::flash_attn::down_bf16;
use crate::flash_attn::{attn_case, poison_bf16, poison_f32, up, Problem};
use crate::flash_attn_tc::check_grad;
use crate::flash_attn_wgmma::{check_dispatch, check_no_key_rows, skip_off_sm90};
use crate::{cuda, to_bf16, widen, Case};
use vppo_engine::backend::cuda::WGMMA_MIN_SEQLEN_Q;

/// `q_lens[s]` queries against `k_lens[s]` keys per sequence.
pub fn wgmma_bwd_case(
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Case {
    let p = Problem::new(q_lens, k_lens, q_heads, kv_heads, head_dim, causal);
    attn_case("flash_attn_wgmma bwd", p, |gpu, rng, p| {
        if let Some(skip) = skip_off_sm90(gpu)? {
            return Ok(skip);
        }
        let (nq, nk, rows) = (p.nq, p.nk, p.rows);
        let [q, k, v] = p.random_qkv(rng).map(|x| to_bf16(&x));
        let dout = to_bf16(&p.random_dout(rng));
        let (qf, kf, vf, df) = (widen(&q), widen(&k), widen(&v), widen(&dout));

        // The CPU twin: forward, then backward from its o and lse.
        let (o_ref, lse_ref) = p.cpu_fwd(&qf, &kf, &vf)?;
        let [dq_ref, dk_ref, dv_ref] = p.cpu_bwd(&qf, &kf, &vf, &o_ref, &lse_ref, &df)?;

        let shape = p.shape()?;
        let (cu_q_d, cu_k_d) = p.upload_offsets(gpu)?;
        let (q_d, k_d, v_d, do_d) = (up(gpu, &q)?, up(gpu, &k)?, up(gpu, &v)?, up(gpu, &dout)?);
        // o and lse from the FA2 forward (the backward's inputs).
        let (mut o_d, mut lse_d) = (poison_bf16(gpu, nq)?, poison_f32(gpu, rows)?);
        gpu.flash_attn_tc_fwd(
            &shape, &q_d, &k_d, &v_d, &cu_q_d, &cu_k_d, &mut o_d, &mut lse_d,
        )
        .map_err(cuda)?;

        // Both backwards on the same buffers, outputs and scratch poisoned.
        let run = |wgmma: bool| -> Result<[Vec<f32>; 3], String> {
            let (mut dq_d, mut dk_d, mut dv_d) = (
                poison_bf16(gpu, nq)?,
                poison_bf16(gpu, nk)?,
                poison_bf16(gpu, nk)?,
            );
            let (mut delta_d, mut dq_acc_d) = (poison_f32(gpu, rows)?, poison_f32(gpu, nq)?);
            let f = if wgmma {
                CudaBwd::flash_attn_wgmma_bwd
            } else {
                CudaBwd::flash_attn_tc_bwd
            };
            f(
                gpu,
                &shape,
                &q_d,
                &k_d,
                &v_d,
                &o_d,
                &lse_d,
                &do_d,
                &cu_q_d,
                &cu_k_d,
                &mut delta_d,
                &mut dq_acc_d,
                &mut dq_d,
                &mut dk_d,
                &mut dv_d,
            )
            .map_err(cuda)?;
            Ok([
                down_bf16(gpu, &dq_d, nq)?,
                down_bf16(gpu, &dk_d, nk)?,
                down_bf16(gpu, &dv_d, nk)?,
            ])
        };
        let [dq_wg, dk_wg, dv_wg] = run(true)?;
        let [dq_tc, dk_tc, dv_tc] = run(false)?;

        let e_dq = check_grad("dq vs cpu", &dq_wg, &dq_ref)?;
        let e_dk = check_grad("dk vs cpu", &dk_wg, &dk_ref)?;
        let e_dv = check_grad("dv vs cpu", &dv_wg, &dv_ref)?;
        let e_dq2 = check_grad("dq vs fa2 kernel", &dq_wg, &dq_tc)?;
        let e_dk2 = check_grad("dk vs fa2 kernel", &dk_wg, &dk_tc)?;
        let e_dv2 = check_grad("dv vs fa2 kernel", &dv_wg, &dv_tc)?;
        // A query row that sees no key contributes nothing: its dq is 0.
        check_no_key_rows("dq", &dq_wg, &lse_ref, p.head_dim)?;

        let chosen = gpu.wgmma_bwd_chosen(&shape);
        let dispatch = check_dispatch("attention_bwd", &shape, WGMMA_MIN_SEQLEN_Q, chosen)?;
        Ok(format!(
            "dq {e_dq:.1e} dk {e_dk:.1e} dv {e_dv:.1e} (fa2 kernel: dq {e_dq2:.1e} \
             dk {e_dk2:.1e} dv {e_dv2:.1e}); dispatch {dispatch}"
        ))
    })
}

/// The two backwards share a signature; naming it keeps `run` one closure.
type CudaBwd = vppo_engine::backend::cuda::CudaBackend;

/// Issue 14's shapes at test size plus the edges: packed odd lengths
/// including 1 (past one 128-key block, past two so that the K/V blocks of
/// a sequence differ, the Q/dO ring wrapping), GQA 28/4 at d = 128, a long
/// single sequence, vision full attention at d = 80 with 16 heads,
/// bidirectional text, more queries than keys (rows that see no key) and
/// fewer, an empty sequence, no keys at all.
pub fn cases() -> Vec<Case> {
    vec![
        wgmma_bwd_case(
            vec![1, 33, 130, 257, 300],
            vec![1, 33, 130, 257, 300],
            28,
            4,
            128,
            true,
        ),
        wgmma_bwd_case(vec![700], vec![700], 4, 1, 128, true),
        wgmma_bwd_case(vec![300, 129], vec![300, 129], 16, 16, 80, false),
        wgmma_bwd_case(vec![257], vec![257], 2, 2, 80, true),
        wgmma_bwd_case(vec![200, 65], vec![200, 65], 4, 2, 128, false),
        wgmma_bwd_case(vec![200, 9], vec![20, 3], 4, 2, 128, true),
        wgmma_bwd_case(vec![3, 140], vec![8, 300], 4, 2, 128, true),
        wgmma_bwd_case(vec![70, 0, 145], vec![70, 0, 145], 6, 1, 64, true),
        wgmma_bwd_case(vec![100], vec![0], 2, 1, 128, false),
    ]
}
