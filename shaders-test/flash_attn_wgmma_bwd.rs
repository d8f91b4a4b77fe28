//! The Hopper flash-attention backward (`kernels/flash_attn_wgmma_bwd.cu`:
//! TMA, warp specialisation, wgmma) against the CPU twin (the f32 op on the
//! bf16-rounded inputs, bf16 tolerance as the FA2 backward's cases) and
//! against the FA2 tensor-core backward on the same inputs (o and lse from
//! the FA2 forward). Only a compute capability 9.0 device runs it; other
//! devices report the case skipped. On a 9.0 device a missing kernel FAILS
//! (the dispatch would silently keep FA2 there).

use crate::flash_attn::offsets;
use crate::flash_attn_tc::{check_grad, down_bf16};
use crate::{cuda, drv, random, to_bf16, widen, Case};
use half::bf16;
use vppo_engine::backend::cpu;
use vppo_engine::backend::cpu::flash_attn::VarlenAttention;
use vppo_engine::backend::cuda::{wgmma_disabled_by_env, FlashAttnShape, WGMMA_BWD_MIN_SEQLEN_Q};

/// `q_lens[s]` queries against `k_lens[s]` keys per sequence.
pub fn wgmma_bwd_case(
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Case {
    Case {
        name: format!(
            "flash_attn_wgmma bwd q={q_lens:?} k={k_lens:?} h={q_heads}/{kv_heads} d={head_dim}{}",
            if causal { " causal" } else { "" }
        ),
        run: Box::new(move |gpu, rng| {
            let cc = gpu.context().compute_capability().map_err(drv)?;
            if cc != (9, 0) {
                return Ok(format!(
                    "SKIPPED: device is sm_{}{}, the wgmma kernel runs on compute capability 9.0 only",
                    cc.0, cc.1
                ));
            }
            let s = gpu.stream();
            let (cu_q, cu_k) = (offsets(&q_lens), offsets(&k_lens));
            let cfg = VarlenAttention {
                cu_seqlens_q: &cu_q,
                cu_seqlens_k: &cu_k,
                q_heads,
                kv_heads,
                head_dim,
                causal,
                scale: 1.0 / (head_dim as f64).sqrt(),
            };
            let (tq, tk): (usize, usize) = (q_lens.iter().sum(), k_lens.iter().sum());
            let (nq, nk, rows) = (
                tq * q_heads * head_dim,
                tk * kv_heads * head_dim,
                tq * q_heads,
            );
            let q = to_bf16(&random(rng, nq, 2.0));
            let k = to_bf16(&random(rng, nk, 2.0));
            let v = to_bf16(&random(rng, nk, 1.0));
            let dout = to_bf16(&random(rng, nq, 1.0));
            let (qf, kf, vf, df) = (widen(&q), widen(&k), widen(&v), widen(&dout));

            // The CPU twin: forward, then backward from its o and lse.
            let mut o_ref = vec![0.0; nq];
            let mut lse_ref = vec![0.0; rows];
            cpu::flash_attn::attention_fwd(&cfg, &qf, &kf, &vf, &mut o_ref, &mut lse_ref)
                .map_err(|e| e.to_string())?;
            let (mut dq_ref, mut dk_ref, mut dv_ref) =
                (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            cpu::flash_attn::attention_bwd(
                &cfg,
                &qf,
                &kf,
                &vf,
                &o_ref,
                &lse_ref,
                &df,
                &mut dq_ref,
                &mut dk_ref,
                &mut dv_ref,
            )
            .map_err(|e| e.to_string())?;

            let shape = FlashAttnShape::of(&cfg).map_err(cuda)?;
            let cu_q_d = s.clone_htod(&cu_q).map_err(drv)?;
            let cu_k_d = s.clone_htod(&cu_k).map_err(drv)?;
            let up = |x: &[bf16]| {
                if x.is_empty() {
                    s.clone_htod(&[bf16::ZERO])
                } else {
                    s.clone_htod(x)
                }
                .map_err(drv)
            };
            let poison_bf16 = |n: usize| s.clone_htod(&vec![bf16::NAN; n.max(1)]).map_err(drv);
            let poison_f32 = |n: usize| s.clone_htod(&vec![f32::NAN; n.max(1)]).map_err(drv);
            let (q_d, k_d, v_d, do_d) = (up(&q)?, up(&k)?, up(&v)?, up(&dout)?);
            // o and lse from the FA2 forward (the backward's inputs).
            let (mut o_d, mut lse_d) = (poison_bf16(nq)?, poison_f32(rows)?);
            gpu.flash_attn_tc_fwd(
                &shape, &q_d, &k_d, &v_d, &cu_q_d, &cu_k_d, &mut o_d, &mut lse_d,
            )
            .map_err(cuda)?;

            // Both backwards on the same buffers, outputs and scratch poisoned.
            let run = |wgmma: bool| -> Result<[Vec<f32>; 3], String> {
                let (mut dq_d, mut dk_d, mut dv_d) =
                    (poison_bf16(nq)?, poison_bf16(nk)?, poison_bf16(nk)?);
                let (mut delta_d, mut dq_acc_d) = (poison_f32(rows)?, poison_f32(nq)?);
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
            if let Some(i) = (0..rows).find(|&i| {
                lse_ref[i] == f32::NEG_INFINITY
                    && dq_wg[i * head_dim..(i + 1) * head_dim]
                        .iter()
                        .any(|&x| x != 0.0)
            }) {
                return Err(format!("row {i} sees no key but dq is not 0"));
            }

            // The dispatch of attention_bwd on this device and shape.
            let want = shape.max_seqlen_q > WGMMA_BWD_MIN_SEQLEN_Q
                && shape.total_k > 0
                && !wgmma_disabled_by_env();
            let chosen = gpu.wgmma_bwd_chosen(&shape);
            if chosen != want {
                return Err(format!(
                    "attention_bwd would take {} (expected {})",
                    if chosen { "wgmma" } else { "fa2" },
                    if want { "wgmma" } else { "fa2" }
                ));
            }
            Ok(format!(
                "dq {e_dq:.1e} dk {e_dk:.1e} dv {e_dv:.1e} (fa2 kernel: dq {e_dq2:.1e} \
                 dk {e_dk2:.1e} dv {e_dv2:.1e}); dispatch {}",
                if chosen { "wgmma" } else { "fa2" }
            ))
        }),
    }
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
