//! The Hopper flash-attention forward (`kernels/flash_attn_wgmma.cu`: TMA,
//! warp specialisation, wgmma) against the CPU twin (the f32 op on the
//! bf16-rounded inputs, bf16 tolerance) and against the FA2 tensor-core
//! kernel on the same inputs. Only a compute capability 9.0 device runs it
//! (sm_90a code runs nowhere else); other devices report the case skipped.
//! On a 9.0 device a missing kernel (say, the driver loaded the module's
//! sm_90 image, which defines none) FAILS: the dispatch would silently keep
//! FA2 there, and this is where that shows.

use crate::flash_attn::offsets;
use crate::flash_attn_tc::{check_lse, down_bf16, down_f32};
use crate::{check, cuda, drv, random, to_bf16, widen, Case, BF16_TOL};
use half::bf16;
use vppo_engine::backend::cpu;
use vppo_engine::backend::cpu::flash_attn::VarlenAttention;
use vppo_engine::backend::cuda::{wgmma_disabled_by_env, FlashAttnShape, WGMMA_MIN_SEQLEN_Q};

/// `q_lens[s]` queries against `k_lens[s]` keys per sequence.
pub fn wgmma_case(
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Case {
    Case {
        name: format!(
            "flash_attn_wgmma fwd q={q_lens:?} k={k_lens:?} h={q_heads}/{kv_heads} d={head_dim}{}",
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
            let (qf, kf, vf) = (widen(&q), widen(&k), widen(&v));

            // The CPU twin on the widened inputs.
            let mut o_ref = vec![0.0; nq];
            let mut lse_ref = vec![0.0; rows];
            cpu::flash_attn::attention_fwd(&cfg, &qf, &kf, &vf, &mut o_ref, &mut lse_ref)
                .map_err(|e| e.to_string())?;

            let shape = FlashAttnShape::of(&cfg).map_err(cuda)?;
            let cu_q_d = s.clone_htod(&cu_q).map_err(drv)?;
            let cu_k_d = s.clone_htod(&cu_k).map_err(drv)?;
            // An empty tensor still gets one element: the allocator takes no 0.
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
            let (q_d, k_d, v_d) = (up(&q)?, up(&k)?, up(&v)?);

            let (mut o_d, mut lse_d) = (poison_bf16(nq)?, poison_f32(rows)?);
            gpu.flash_attn_wgmma_fwd(
                &shape, &q_d, &k_d, &v_d, &cu_q_d, &cu_k_d, &mut o_d, &mut lse_d,
            )
            .map_err(cuda)?;
            let o_wg = down_bf16(gpu, &o_d, nq)?;
            let lse_wg = down_f32(gpu, &lse_d, rows)?;

            // The FA2 tensor-core kernel on the same bf16 inputs.
            let (mut o2_d, mut lse2_d) = (poison_bf16(nq)?, poison_f32(rows)?);
            gpu.flash_attn_tc_fwd(
                &shape,
                &q_d,
                &k_d,
                &v_d,
                &cu_q_d,
                &cu_k_d,
                &mut o2_d,
                &mut lse2_d,
            )
            .map_err(cuda)?;
            let o_tc = down_bf16(gpu, &o2_d, nq)?;
            let lse_tc = down_f32(gpu, &lse2_d, rows)?;

            let e_o = check("o vs cpu", &o_wg, &o_ref, BF16_TOL)?;
            let e_l = check_lse("lse vs cpu", &lse_wg, &lse_ref)?;
            let e_o2 = check("o vs fa2 kernel", &o_wg, &o_tc, BF16_TOL)?;
            let e_l2 = check_lse("lse vs fa2 kernel", &lse_wg, &lse_tc)?;
            // The rows that see no key: exactly 0 (not merely small).
            if let Some(i) = (0..rows).find(|&i| {
                lse_ref[i] == f32::NEG_INFINITY
                    && o_wg[i * head_dim..(i + 1) * head_dim]
                        .iter()
                        .any(|&x| x != 0.0)
            }) {
                return Err(format!("row {i} sees no key but o is not 0"));
            }

            // The dispatch of attention_fwd on this device and shape.
            let want = shape.max_seqlen_q > WGMMA_MIN_SEQLEN_Q
                && shape.total_k > 0
                && !wgmma_disabled_by_env();
            let chosen = gpu.wgmma_fwd_chosen(&shape);
            if chosen != want {
                return Err(format!(
                    "attention_fwd would take {} (expected {})",
                    if chosen { "wgmma" } else { "fa2" },
                    if want { "wgmma" } else { "fa2" }
                ));
            }
            Ok(format!(
                "o {e_o:.1e} lse {e_l:.1e} (fa2 kernel: o {e_o2:.1e} lse {e_l2:.1e}); dispatch {}",
                if chosen { "wgmma" } else { "fa2" }
            ))
        }),
    }
}

/// Issue 14's shapes at test size plus the edges: several packed sequences
/// of odd lengths (length 1, past one 128-row block, past two 128-key tiles
/// so the 2-stage ring wraps), GQA 28/4, vision full attention at d = 80,
/// bidirectional text, fewer queries than keys and more (whole 128-row
/// blocks and single rows that see no key), an empty sequence, no keys at all.
pub fn cases() -> Vec<Case> {
    vec![
        // Text: causal, 28/4 GQA heads, d = 128.
        wgmma_case(
            vec![1, 33, 130, 257, 300],
            vec![1, 33, 130, 257, 300],
            28,
            4,
            128,
            true,
        ),
        // One long sequence: 6 key tiles (the ring wraps three times).
        wgmma_case(vec![700], vec![700], 4, 1, 128, true),
        // Vision full image: bidirectional, 16 heads, d = 80, odd lengths.
        wgmma_case(vec![300, 129], vec![300, 129], 16, 16, 80, false),
        wgmma_case(vec![257], vec![257], 2, 2, 80, true),
        // Bidirectional text.
        wgmma_case(vec![200, 65], vec![200, 65], 4, 2, 128, false),
        // More queries than keys (causal, ends aligned): the first 128-row
        // block of sequence 0 sees no key at all (its producer loads
        // nothing), the second sees some in part; sequence 1's rows 0..5
        // see none.
        wgmma_case(vec![200, 9], vec![20, 3], 4, 2, 128, true),
        // Fewer queries than keys.
        wgmma_case(vec![3, 140], vec![8, 300], 4, 2, 128, true),
        // An empty sequence between two, d = 64.
        wgmma_case(vec![70, 0, 145], vec![70, 0, 145], 6, 1, 64, true),
        // No keys at all (the launcher hands the call to the FA2 kernel).
        wgmma_case(vec![100], vec![0], 2, 1, 128, false),
    ]
}
