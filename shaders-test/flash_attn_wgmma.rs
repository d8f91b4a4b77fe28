//! The Hopper flash-attention forward (`kernels/flash_attn_wgmma.cu`: TMA,
//! warp specialisation, wgmma) against the CPU twin (the f32 op on the
//! bf16-rounded inputs, bf16 tolerance) and against the FA2 tensor-core
//! kernel on the same inputs. Only a compute capability 9.0 device runs it
//! (sm_90a code runs nowhere else); other devices report the case skipped.
//! On a 9.0 device a missing kernel (say, the driver loaded the module's
//! sm_90 image, which defines none) FAILS: the dispatch would silently keep
//! FA2 there, and this is where that shows.

use crate::flash_attn::{attn_case, poison_bf16, poison_f32, up, Problem};
use crate::flash_attn::{down_bf16, down_f32};
use crate::flash_attn_tc::check_lse;
use crate::{check, cuda, drv, to_bf16, widen, Case, BF16_TOL};
use vppo_engine::backend::cuda::{
    wgmma_disabled_by_env, CudaBackend, FlashAttnShape, WGMMA_MIN_SEQLEN_Q,
};

/// `Some(why)` on a device that is not compute capability 9.0: sm_90a code
/// runs nowhere else, so the wgmma cases report themselves skipped there.
pub(crate) fn skip_off_sm90(gpu: &CudaBackend) -> Result<Option<String>, String> {
    let cc = gpu.context().compute_capability().map_err(drv)?;
    Ok((cc != (9, 0)).then(|| {
        format!(
            "SKIPPED: device is sm_{}{}, the wgmma kernel runs on compute capability 9.0 only",
            cc.0, cc.1
        )
    }))
}

/// A query row that sees no key (lse -inf in the CPU twin) must get exactly
/// 0 in `x` (`what`: o or dq), not merely something small.
pub(crate) fn check_no_key_rows(
    what: &str,
    x: &[f32],
    lse_ref: &[f32],
    head_dim: usize,
) -> Result<(), String> {
    match (0..lse_ref.len()).find(|&i| {
        lse_ref[i] == f32::NEG_INFINITY
            && x[i * head_dim..(i + 1) * head_dim]
                .iter()
                .any(|&x| x != 0.0)
    }) {
        Some(i) => Err(format!("row {i} sees no key but {what} is not 0")),
        None => Ok(()),
    }
}

/// The dispatch of `op` (`attention_fwd`/`attention_bwd`) on this device and
/// shape, `chosen`, must be the wgmma kernel exactly when the shape has
/// more than `min_seqlen_q` queries in a sequence and keys, and
/// `VPPO_ATTN_WGMMA` does not disable it. Returns the kernel's name.
pub(crate) fn check_dispatch(
    op: &str,
    shape: &FlashAttnShape,
    min_seqlen_q: usize,
    chosen: bool,
) -> Result<&'static str, String> {
    let want = shape.max_seqlen_q > min_seqlen_q && shape.total_k > 0 && !wgmma_disabled_by_env();
    let name = |wgmma: bool| if wgmma { "wgmma" } else { "fa2" };
    if chosen != want {
        return Err(format!(
            "{op} would take {} (expected {})",
            name(chosen),
            name(want)
        ));
    }
    Ok(name(chosen))
}

/// `q_lens[s]` queries against `k_lens[s]` keys per sequence.
pub fn wgmma_case(
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Case {
    let p = Problem::new(q_lens, k_lens, q_heads, kv_heads, head_dim, causal);
    attn_case("flash_attn_wgmma fwd", p, |gpu, rng, p| {
        if let Some(skip) = skip_off_sm90(gpu)? {
            return Ok(skip);
        }
        let (nq, rows) = (p.nq, p.rows);
        let [q, k, v] = p.random_qkv(rng).map(|x| to_bf16(&x));
        let (qf, kf, vf) = (widen(&q), widen(&k), widen(&v));

        // The CPU twin on the widened inputs.
        let (o_ref, lse_ref) = p.cpu_fwd(&qf, &kf, &vf)?;

        let shape = p.shape()?;
        let (cu_q_d, cu_k_d) = p.upload_offsets(gpu)?;
        let (q_d, k_d, v_d) = (up(gpu, &q)?, up(gpu, &k)?, up(gpu, &v)?);

        let (mut o_d, mut lse_d) = (poison_bf16(gpu, nq)?, poison_f32(gpu, rows)?);
        gpu.flash_attn_wgmma_fwd(
            &shape, &q_d, &k_d, &v_d, &cu_q_d, &cu_k_d, &mut o_d, &mut lse_d,
        )
        .map_err(cuda)?;
        let o_wg = down_bf16(gpu, &o_d, nq)?;
        let lse_wg = down_f32(gpu, &lse_d, rows)?;

        // The FA2 tensor-core kernel on the same bf16 inputs.
        let (mut o2_d, mut lse2_d) = (poison_bf16(gpu, nq)?, poison_f32(gpu, rows)?);
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
        check_no_key_rows("o", &o_wg, &lse_ref, p.head_dim)?;

        let chosen = gpu.wgmma_fwd_chosen(&shape);
        let dispatch = check_dispatch("attention_fwd", &shape, WGMMA_MIN_SEQLEN_Q, chosen)?;
        Ok(format!(
            "o {e_o:.1e} lse {e_l:.1e} (fa2 kernel: o {e_o2:.1e} lse {e_l2:.1e}); dispatch {dispatch}"
        ))
    })
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
