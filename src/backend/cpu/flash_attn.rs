//! Scaled dot-product attention over packed variable-length sequences
//! (`cu_seqlens`), causal or bidirectional, with grouped-query heads.
//!
//! Layout: `q[Tq, q_heads, head_dim]`, `k, v[Tk, kv_heads, head_dim]`, output
//! `o[Tq, q_heads, head_dim]`. Sequence `s` owns query rows
//! `cu_seqlens_q[s]..cu_seqlens_q[s+1]` and key rows likewise from
//! `cu_seqlens_k`. Query head `h` reads kv head `h / (q_heads / kv_heads)`.
//! Causal masking aligns the ends (as flash-attention does): query `i` of a
//! sequence with `Lq` queries and `Lk` keys sees keys `j <= i + Lk - Lq`.
//! A query that sees no key outputs zeros with `lse = -inf`.
//!
//! Saved for the backward: `lse[Tq, q_heads]`, the log-sum-exp of each row of
//! scaled scores, so the backward recomputes probabilities block by block and
//! no `[L, L]` matrix is kept (the flash-attention contract).
//! GPU twin: `kernels/flash_attn.cu` (flash_attn_fwd_*, flash_attn_bwd_*).

use super::gemm::{gemm_view, MatView};
use super::{check_cu_seqlens, OpError, Real};
use rayon::prelude::*;

/// Query rows per block: bounds the score scratch to `[Q_BLOCK, Lk]`.
const Q_BLOCK: usize = 64;

pub use crate::backend::desc::VarlenAttention;

/// Validated offsets of every sequence.
struct Plan {
    q_start: Vec<usize>,
    k_start: Vec<usize>,
}

impl Plan {
    fn seqs(&self) -> usize {
        self.q_start.len() - 1
    }
    fn lens(&self, s: usize) -> (usize, usize) {
        (
            self.q_start[s + 1] - self.q_start[s],
            self.k_start[s + 1] - self.k_start[s],
        )
    }
}

impl VarlenAttention<'_> {
    fn plan(&self, q_len: usize, k_len: usize, v_len: usize) -> Result<Plan, OpError> {
        assert!(
            self.head_dim > 0 && self.q_heads > 0 && self.kv_heads > 0,
            "attention: empty heads"
        );
        assert_eq!(
            self.q_heads % self.kv_heads,
            0,
            "attention: q_heads must be a multiple of kv_heads"
        );
        assert_eq!(
            self.cu_seqlens_q.len(),
            self.cu_seqlens_k.len(),
            "attention: q and k sequence counts differ"
        );
        assert!(
            !self.cu_seqlens_q.is_empty(),
            "attention: cu_seqlens is empty"
        );
        let q_row = self.q_heads * self.head_dim;
        let k_row = self.kv_heads * self.head_dim;
        assert_eq!(
            q_len % q_row,
            0,
            "attention: q is not [T, q_heads, head_dim]"
        );
        assert_eq!(
            k_len % k_row,
            0,
            "attention: k is not [T, kv_heads, head_dim]"
        );
        assert_eq!(k_len, v_len, "attention: k and v differ in length");
        Ok(Plan {
            q_start: check_cu_seqlens(self.cu_seqlens_q, q_len / q_row)?,
            k_start: check_cu_seqlens(self.cu_seqlens_k, k_len / k_row)?,
        })
    }

    /// Number of keys query `i` (0-based in its sequence) may see.
    fn visible_keys(&self, i: usize, lq: usize, lk: usize) -> usize {
        if self.causal {
            (i as isize + 1 + lk as isize - lq as isize).clamp(0, lk as isize) as usize
        } else {
            lk
        }
    }

    fn q_view(&self, row: usize, head: usize, rows: usize) -> MatView {
        let stride = self.q_heads * self.head_dim;
        MatView {
            offset: row * stride + head * self.head_dim,
            rows,
            cols: self.head_dim,
            row_stride: stride,
            col_stride: 1,
        }
    }

    fn kv_view(&self, row: usize, kv_head: usize, rows: usize) -> MatView {
        let stride = self.kv_heads * self.head_dim;
        MatView {
            offset: row * stride + kv_head * self.head_dim,
            rows,
            cols: self.head_dim,
            row_stride: stride,
            col_stride: 1,
        }
    }

    fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// Probabilities of query rows `i0..i0+bq` of sequence `s` against its
    /// first `keys` keys, in `p[bq, keys]`. With `lse` given (backward) they
    /// are `exp(score - lse)`; otherwise (forward) the row's log-sum-exp is
    /// computed and returned.
    #[allow(clippy::too_many_arguments)]
    fn probabilities<R: Real>(
        &self,
        plan: &Plan,
        s: usize,
        h: usize,
        i0: usize,
        bq: usize,
        keys: usize,
        q: &[R],
        k: &[R],
        saved_lse: Option<&[R]>,
        p: &mut [R],
    ) -> Vec<R> {
        if keys == 0 {
            return vec![R::neg_infinity(); bq];
        }
        let (lq, lk) = plan.lens(s);
        let kv_head = h / self.group();
        gemm_view(
            R::from_f64(self.scale),
            q,
            self.q_view(plan.q_start[s] + i0, h, bq),
            k,
            self.kv_view(plan.k_start[s], kv_head, keys).t(),
            R::zero(),
            p,
            MatView::row_major(bq, keys),
        );
        let mut lse_rows = Vec::with_capacity(bq);
        for (r, row) in p.chunks_mut(keys.max(1)).take(bq).enumerate() {
            let visible = self.visible_keys(i0 + r, lq, lk);
            let lse = match saved_lse {
                Some(saved) => saved[r],
                None => log_sum_exp(&row[..visible]),
            };
            for (j, v) in row.iter_mut().enumerate() {
                *v = if j < visible && lse.is_finite() {
                    (*v - lse).exp()
                } else {
                    R::zero()
                };
            }
            lse_rows.push(lse);
        }
        lse_rows
    }
}

fn log_sum_exp<R: Real>(row: &[R]) -> R {
    let m = row.iter().copied().fold(R::neg_infinity(), R::max);
    if m == R::neg_infinity() {
        return m;
    }
    m + row.iter().map(|&v| (v - m).exp()).sum::<R>().ln()
}

/// Forward: writes `o[Tq, q_heads, head_dim]` and `lse[Tq, q_heads]`.
pub fn attention_fwd<R: Real>(
    cfg: &VarlenAttention,
    q: &[R],
    k: &[R],
    v: &[R],
    o: &mut [R],
    lse: &mut [R],
) -> Result<(), OpError> {
    let plan = cfg.plan(q.len(), k.len(), v.len())?;
    assert_eq!(o.len(), q.len(), "attention: output length");
    assert_eq!(lse.len(), q.len() / cfg.head_dim, "attention: lse length");
    let d = cfg.head_dim;
    let mut tasks = Vec::new();
    for s in 0..plan.seqs() {
        let (lq, _) = plan.lens(s);
        for h in 0..cfg.q_heads {
            for i0 in (0..lq).step_by(Q_BLOCK) {
                tasks.push((s, h, i0, Q_BLOCK.min(lq - i0)));
            }
        }
    }
    let results: Vec<_> = tasks
        .par_iter()
        .map(|&(s, h, i0, bq)| {
            let (lq, lk) = plan.lens(s);
            let keys = cfg.visible_keys(i0 + bq - 1, lq, lk);
            let mut p = vec![R::zero(); bq * keys];
            let lse_rows = cfg.probabilities(&plan, s, h, i0, bq, keys, q, k, None, &mut p);
            let mut out = vec![R::zero(); bq * d];
            gemm_view(
                R::one(),
                &p,
                MatView::row_major(bq, keys),
                v,
                cfg.kv_view(plan.k_start[s], h / cfg.group(), keys),
                R::zero(),
                &mut out,
                MatView::row_major(bq, d),
            );
            (s, h, i0, out, lse_rows)
        })
        .collect();
    for (s, h, i0, out, lse_rows) in results {
        for (r, (row, l)) in out.chunks(d).zip(lse_rows).enumerate() {
            let t = plan.q_start[s] + i0 + r;
            let at = (t * cfg.q_heads + h) * d;
            o[at..at + d].copy_from_slice(row);
            lse[t * cfg.q_heads + h] = l;
        }
    }
    Ok(())
}

/// Gradients of one (sequence, kv head) pair: dq for each query head of the
/// group, and dk/dv summed over the group.
struct KvHeadGrads<R> {
    s: usize,
    kv_head: usize,
    dq: Vec<Vec<R>>,
    dk: Vec<R>,
    dv: Vec<R>,
}

/// Backward: given `dout`, writes `dq`, `dk`, `dv` (overwritten). Uses the
/// forward's `o` and `lse`; probabilities are recomputed per query block.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<R: Real>(
    cfg: &VarlenAttention,
    q: &[R],
    k: &[R],
    v: &[R],
    o: &[R],
    lse: &[R],
    dout: &[R],
    dq: &mut [R],
    dk: &mut [R],
    dv: &mut [R],
) -> Result<(), OpError> {
    let plan = cfg.plan(q.len(), k.len(), v.len())?;
    assert!(
        o.len() == q.len() && dout.len() == q.len() && dq.len() == q.len(),
        "attention: q-side lengths"
    );
    assert!(
        dk.len() == k.len() && dv.len() == v.len(),
        "attention: kv-side lengths"
    );
    assert_eq!(lse.len(), q.len() / cfg.head_dim, "attention: lse length");
    let d = cfg.head_dim;
    let scale = R::from_f64(cfg.scale);
    let tasks: Vec<(usize, usize)> = (0..plan.seqs())
        .flat_map(|s| (0..cfg.kv_heads).map(move |g| (s, g)))
        .collect();
    let results: Vec<KvHeadGrads<R>> = tasks
        .par_iter()
        .map(|&(s, g)| {
            let (lq, lk) = plan.lens(s);
            let (qs, ks) = (plan.q_start[s], plan.k_start[s]);
            let mut dk_acc = vec![R::zero(); lk * d];
            let mut dv_acc = vec![R::zero(); lk * d];
            let mut dq_heads = Vec::with_capacity(cfg.group());
            for h in g * cfg.group()..(g + 1) * cfg.group() {
                let mut dq_h = vec![R::zero(); lq * d];
                for i0 in (0..lq).step_by(Q_BLOCK) {
                    let bq = Q_BLOCK.min(lq - i0);
                    let keys = cfg.visible_keys(i0 + bq - 1, lq, lk);
                    if keys == 0 {
                        continue;
                    }
                    let saved: Vec<R> = (0..bq)
                        .map(|r| lse[(qs + i0 + r) * cfg.q_heads + h])
                        .collect();
                    let mut p = vec![R::zero(); bq * keys];
                    cfg.probabilities(&plan, s, h, i0, bq, keys, q, k, Some(&saved), &mut p);
                    let p_view = MatView::row_major(bq, keys);
                    let do_view = cfg.q_view(qs + i0, h, bq);
                    let acc_view = MatView::row_major(keys, d);
                    // dV += P^T dO
                    gemm_view(
                        R::one(),
                        &p,
                        p_view.t(),
                        dout,
                        do_view,
                        R::one(),
                        &mut dv_acc,
                        acc_view,
                    );
                    // dP = dO V^T, then dS = P * (dP - rowsum(dO * O)) in place.
                    let mut ds = vec![R::zero(); bq * keys];
                    gemm_view(
                        R::one(),
                        dout,
                        do_view,
                        v,
                        cfg.kv_view(ks, g, keys).t(),
                        R::zero(),
                        &mut ds,
                        p_view,
                    );
                    for r in 0..bq {
                        let at = ((qs + i0 + r) * cfg.q_heads + h) * d;
                        let delta: R = (0..d).map(|c| dout[at + c] * o[at + c]).sum();
                        for j in 0..keys {
                            let idx = r * keys + j;
                            ds[idx] = p[idx] * (ds[idx] - delta);
                        }
                    }
                    // dQ = scale dS K ; dK += scale dS^T Q
                    gemm_view(
                        scale,
                        &ds,
                        p_view,
                        k,
                        cfg.kv_view(ks, g, keys),
                        R::zero(),
                        &mut dq_h,
                        MatView::row_major(bq, d).at(i0 * d),
                    );
                    gemm_view(
                        scale,
                        &ds,
                        p_view.t(),
                        q,
                        cfg.q_view(qs + i0, h, bq),
                        R::one(),
                        &mut dk_acc,
                        acc_view,
                    );
                }
                dq_heads.push(dq_h);
            }
            KvHeadGrads {
                s,
                kv_head: g,
                dq: dq_heads,
                dk: dk_acc,
                dv: dv_acc,
            }
        })
        .collect();
    for r in results {
        let (qs, ks) = (plan.q_start[r.s], plan.k_start[r.s]);
        for (i, dq_h) in r.dq.iter().enumerate() {
            let h = r.kv_head * cfg.group() + i;
            for (row, src) in dq_h.chunks(d).enumerate() {
                let at = ((qs + row) * cfg.q_heads + h) * d;
                dq[at..at + d].copy_from_slice(src);
            }
        }
        for (row, (dk_src, dv_src)) in r.dk.chunks(d).zip(r.dv.chunks(d)).enumerate() {
            let at = ((ks + row) * cfg.kv_heads + r.kv_head) * d;
            dk[at..at + d].copy_from_slice(dk_src);
            dv[at..at + d].copy_from_slice(dv_src);
        }
    }
    Ok(())
}
