//! Tensor-core flash attention (`kernels/flash_attn_tc.cu`, bf16) against
//! the CPU twin (the f32 op on the bf16-rounded inputs, bf16 tolerance) and
//! against the fp32 CUDA-core kernel on the same widened inputs, forward and
//! backward.

use crate::flash_attn::{attn_case, down_bf16, down_f32, poison_bf16, poison_f32, up, Problem};
use crate::{check, cuda, to_bf16, widen, Case, BF16_TOL};

/// The log-sum-exp is f32 in every kernel; the tensor-core kernel sums in
/// another order and with exp2, so it is held to 1e-4 (a wrong row or
/// mask moves it by far more). Infinities must agree exactly.
const LSE_TOL: f64 = 1e-4;

pub(crate) fn check_lse(what: &str, gpu: &[f32], reference: &[f32]) -> Result<f64, String> {
    if let Some(i) = (0..reference.len()).find(|&i| {
        reference[i].is_finite() != gpu[i].is_finite()
            || (!reference[i].is_finite() && gpu[i] != reference[i])
    }) {
        return Err(format!(
            "{what}[{i}]: gpu {} reference {}",
            gpu[i], reference[i]
        ));
    }
    let finite = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .zip(reference)
            .filter(|(_, r)| r.is_finite())
            .map(|(x, _)| *x)
            .collect()
    };
    check(what, &finite(gpu), &finite(reference), LSE_TOL)
}

/// Gradients: relative error below `BF16_TOL`, measured against
/// `max(||reference||, GRAD_FLOOR_RMS sqrt(n))`. With one visible key a
/// query's dq (and its key's dk) is exactly 0 and both sides hold only
/// rounding noise (~1e-7) that a pure relative error would call a miss; any
/// wrong row or mask moves typical gradients (RMS ~0.1) by far more.
const GRAD_FLOOR_RMS: f64 = 1e-3;

pub fn check_grad(what: &str, gpu: &[f32], reference: &[f32]) -> Result<f64, String> {
    if gpu.len() != reference.len() || gpu.iter().any(|v| !v.is_finite()) {
        return Err(format!("{what}: length differs or not finite"));
    }
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let num = norm(&mut gpu.iter().zip(reference).map(|(a, b)| (a - b) as f64));
    let den = norm(&mut reference.iter().map(|&b| b as f64))
        .max(GRAD_FLOOR_RMS * (reference.len() as f64).sqrt());
    let e = if den == 0.0 { num } else { num / den };
    if e <= BF16_TOL {
        Ok(e)
    } else {
        Err(format!("{what}: rel err {e:e} > {BF16_TOL:e}"))
    }
}

/// `q_lens[s]` queries against `k_lens[s]` keys per sequence.
pub fn tc_case(
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Case {
    let p = Problem::new(q_lens, k_lens, q_heads, kv_heads, head_dim, causal);
    attn_case("flash_attn_tc fwd+bwd", p, |gpu, rng, p| {
        let (nq, nk, rows) = (p.nq, p.nk, p.rows);
        let [q, k, v] = p.random_qkv(rng).map(|x| to_bf16(&x));
        let (qf, kf, vf) = (widen(&q), widen(&k), widen(&v));

        // The CPU twin on the widened inputs.
        let (o_ref, lse_ref) = p.cpu_fwd(&qf, &kf, &vf)?;

        let shape = p.shape()?;
        let (cu_q_d, cu_k_d) = p.upload_offsets(gpu)?;
        let (q_d, k_d, v_d) = (up(gpu, &q)?, up(gpu, &k)?, up(gpu, &v)?);
        let (mut o_d, mut lse_d) = (poison_bf16(gpu, nq)?, poison_f32(gpu, rows)?);
        gpu.flash_attn_tc_fwd(
            &shape, &q_d, &k_d, &v_d, &cu_q_d, &cu_k_d, &mut o_d, &mut lse_d,
        )
        .map_err(cuda)?;
        let o_tc = down_bf16(gpu, &o_d, nq)?;
        let lse_tc = down_f32(gpu, &lse_d, rows)?;

        // The fp32 CUDA-core kernel on the same widened inputs.
        let (qf_d, kf_d, vf_d) = (up(gpu, &qf)?, up(gpu, &kf)?, up(gpu, &vf)?);
        let (mut o32_d, mut lse32_d) = (poison_f32(gpu, nq)?, poison_f32(gpu, rows)?);
        gpu.flash_attn_fwd(
            &shape,
            &qf_d,
            &kf_d,
            &vf_d,
            &cu_q_d,
            &cu_k_d,
            &mut o32_d,
            &mut lse32_d,
        )
        .map_err(cuda)?;
        let o32 = down_f32(gpu, &o32_d, nq)?;
        let lse32 = down_f32(gpu, &lse32_d, rows)?;

        let e_o = check("o vs cpu", &o_tc, &o_ref, BF16_TOL)?;
        let e_l = check_lse("lse vs cpu", &lse_tc, &lse_ref)?;
        let e_o32 = check("o vs fp32 kernel", &o_tc, &o32, BF16_TOL)?;
        let e_l32 = check_lse("lse vs fp32 kernel", &lse_tc, &lse32)?;

        // Backward from the tensor-core forward's o and lse.
        let dout = to_bf16(&p.random_dout(rng));
        let df = widen(&dout);
        let [dq_ref, dk_ref, dv_ref] = p.cpu_bwd(&qf, &kf, &vf, &o_ref, &lse_ref, &df)?;
        let do_d = up(gpu, &dout)?;
        let (mut dq_d, mut dk_d, mut dv_d) = (
            poison_bf16(gpu, nq)?,
            poison_bf16(gpu, nk)?,
            poison_bf16(gpu, nk)?,
        );
        let (mut delta_d, mut dq_acc_d) = (poison_f32(gpu, rows)?, poison_f32(gpu, nq)?);
        gpu.flash_attn_tc_bwd(
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
        let dq_tc = down_bf16(gpu, &dq_d, nq)?;
        let dk_tc = down_bf16(gpu, &dk_d, nk)?;
        let dv_tc = down_bf16(gpu, &dv_d, nk)?;

        // The fp32 kernel's backward from its own forward.
        let do32_d = up(gpu, &df)?;
        let (mut dq32_d, mut dk32_d, mut dv32_d) = (
            poison_f32(gpu, nq)?,
            poison_f32(gpu, nk)?,
            poison_f32(gpu, nk)?,
        );
        let mut delta32_d = poison_f32(gpu, rows)?;
        gpu.flash_attn_bwd(
            &shape,
            &qf_d,
            &kf_d,
            &vf_d,
            &o32_d,
            &lse32_d,
            &do32_d,
            &cu_q_d,
            &cu_k_d,
            &mut delta32_d,
            &mut dq32_d,
            &mut dk32_d,
            &mut dv32_d,
        )
        .map_err(cuda)?;
        let dq32 = down_f32(gpu, &dq32_d, nq)?;
        let dk32 = down_f32(gpu, &dk32_d, nk)?;
        let dv32 = down_f32(gpu, &dv32_d, nk)?;

        let e_dq = check_grad("dq vs cpu", &dq_tc, &dq_ref)?;
        let e_dk = check_grad("dk vs cpu", &dk_tc, &dk_ref)?;
        let e_dv = check_grad("dv vs cpu", &dv_tc, &dv_ref)?;
        let e_dq32 = check_grad("dq vs fp32 kernel", &dq_tc, &dq32)?;
        let e_dk32 = check_grad("dk vs fp32 kernel", &dk_tc, &dk32)?;
        let e_dv32 = check_grad("dv vs fp32 kernel", &dv_tc, &dv32)?;
        Ok(format!(
            "o {e_o:.1e} lse {e_l:.1e} dq {e_dq:.1e} dk {e_dk:.1e} dv {e_dv:.1e} \
             (fp32 kernel: o {e_o32:.1e} lse {e_l32:.1e} dq {e_dq32:.1e} dk {e_dk32:.1e} dv {e_dv32:.1e})"
        ))
    })
}

/// Every case of issue 14's table at test size, plus the edges: odd
/// lengths, length 1, empty sequences, fewer queries than keys and more
/// (rows and whole 64-row tiles that see no key), the small head dims.
pub fn cases() -> Vec<Case> {
    let windows = |n: usize| vec![64; n];
    vec![
        // Text: causal, 28/4 GQA heads, d = 128; 1 and odd lengths, a
        // sequence past one 128-row tile and one key tile.
        tc_case(
            vec![1, 33, 130, 257],
            vec![1, 33, 130, 257],
            28,
            4,
            128,
            true,
        ),
        tc_case(vec![1], vec![1], 4, 4, 128, true),
        tc_case(vec![70, 0, 45], vec![70, 0, 45], 6, 1, 128, true),
        // Vision full image: bidirectional, 16 heads, d = 80, odd length.
        tc_case(vec![300], vec![300], 16, 16, 80, false),
        // Vision windows of 64 keys (64-row tiles), with a short odd window.
        tc_case(
            [windows(6), vec![37]].concat(),
            [windows(6), vec![37]].concat(),
            16,
            16,
            80,
            false,
        ),
        tc_case(vec![1], vec![1], 2, 2, 80, false),
        // Fewer queries than keys (ends aligned), and more: causal rows and
        // whole tiles that see no key get o = 0, lse = -inf.
        tc_case(vec![3, 40], vec![8, 77], 4, 2, 128, true),
        tc_case(vec![200, 9], vec![20, 3], 4, 2, 128, true),
        tc_case(vec![7, 40], vec![33, 2], 2, 1, 80, false),
        // Small head dims (test-size models use 16).
        tc_case(vec![64, 48], vec![64, 48], 2, 2, 16, false),
        tc_case(vec![93], vec![93], 4, 2, 16, true),
        tc_case(vec![1, 70], vec![1, 70], 8, 8, 64, true),
    ]
}
