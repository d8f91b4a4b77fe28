//! [`Backend`] on the CPU: the reference ops of `backend::cpu` over
//! `Vec<f32>` buffers (rayon inside each op).

use super::{Backend, DType, Result, WeightGrads, WeightRows};
use crate::backend::cpu::activations::{gelu_bwd, gelu_fwd, swiglu_bwd, swiglu_fwd};
use crate::backend::cpu::adamw::{adamw_step, global_grad_norm};
use crate::backend::cpu::embedding::{embedding_bwd, embedding_fwd};
use crate::backend::cpu::flash_attn::{attention_bwd, attention_fwd};
use crate::backend::cpu::linear::{linear_bwd, linear_fwd};
use crate::backend::cpu::logprob::{token_logprob_bwd, token_logprob_fwd};
use crate::backend::cpu::paged_attn::paged_decode_attention;
use crate::backend::cpu::patch_embed::patch_embed;
use crate::backend::cpu::rmsnorm::{rmsnorm_bwd, rmsnorm_fwd};
use crate::backend::cpu::rope::{rope_bwd, rope_fwd, RopeTable};
use crate::backend::cpu::rows::{add_inplace, gather_rows, scatter_rows, PARALLEL_MIN_ELEMS};
use crate::backend::cpu::sampling::sample_token_with_uniform;
use crate::backend::cpu::softmax_kl::softmax_kl_fwd;
use crate::backend::cpu::OpError;
use crate::backend::desc::{
    AdamWConfig, AttnSpec, PagedSeq, PagedShape, PatchGeometry, RopeFreqs, SamplingParams,
};
use rayon::prelude::*;

/// The CPU backend (stateless: rayon's pool does the threading).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Index = Vec<i32>;
    type Ids = Vec<u32>;
    type Rope = RopeTable<f32>;
    type Seqlens = Vec<i32>;
    type Graph = std::convert::Infallible;

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn cast(&self, buf: &Vec<f32>, dtype: DType) -> Result<Vec<f32>> {
        match dtype {
            DType::F32 => Ok(buf.clone()),
            DType::Bf16 => Err(OpError::Bf16OnFp32Backend.into()),
        }
    }

    fn copy(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn concat(&self, parts: &[&Vec<f32>]) -> Result<Vec<f32>> {
        Ok(parts.iter().flat_map(|p| p.iter().copied()).collect())
    }

    fn fill_zero(&self, buf: &mut Vec<f32>) -> Result<()> {
        buf.fill(0.0);
        Ok(())
    }

    fn write(&self, dst: &mut Vec<f32>, host: &[f32]) -> Result<()> {
        dst.copy_from_slice(host);
        Ok(())
    }

    fn index(&self, host: &[i32]) -> Result<Vec<i32>> {
        Ok(host.to_vec())
    }

    fn ids(&self, host: &[u32]) -> Result<Vec<u32>> {
        Ok(host.to_vec())
    }

    fn seqlens(&self, cu: &[i32]) -> Result<Vec<i32>> {
        Ok(cu.to_vec())
    }

    fn rope(&self, freqs: &RopeFreqs, streams: &[&[i32]]) -> Result<RopeTable<f32>> {
        Ok(freqs.table(streams))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn capture(&self, _body: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>> {
        Ok(None)
    }

    fn replay(&self, graph: &Self::Graph) -> Result<()> {
        match *graph {}
    }

    fn write_index(&self, dst: &mut Vec<i32>, host: &[i32]) -> Result<()> {
        dst.copy_from_slice(host);
        Ok(())
    }

    fn write_ids(&self, dst: &mut Vec<u32>, host: &[u32]) -> Result<()> {
        dst.copy_from_slice(host);
        Ok(())
    }

    fn write_rope(
        &self,
        rope: &mut RopeTable<f32>,
        freqs: &RopeFreqs,
        streams: &[&[i32]],
    ) -> Result<()> {
        let table = freqs.table(streams);
        assert_eq!(table.tokens, rope.tokens, "write_rope: token counts differ");
        *rope = table;
        Ok(())
    }

    fn copy_into(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        dst.copy_from_slice(src);
        Ok(())
    }

    fn linear_fwd(
        &self,
        x: &Vec<f32>,
        rows: usize,
        inp: usize,
        w: &WeightRows<'_, Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let out = w.rows.len();
        let mut y = vec![0.0; rows * out];
        linear_fwd(
            x,
            &w.weight[w.rows.start * inp..w.rows.end * inp],
            w.bias.map(|b| &b[w.rows.clone()]),
            rows,
            inp,
            out,
            &mut y,
        );
        Ok(y)
    }

    fn linear_bwd(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        rows: usize,
        inp: usize,
        w: &Vec<f32>,
        g: WeightGrads<'_, Vec<f32>>,
        want_dx: bool,
    ) -> Result<Option<Vec<f32>>> {
        let (r0, r1) = (g.rows.start, g.rows.end);
        let out = r1 - r0;
        let mut dx = want_dx.then(|| vec![0.0; rows * inp]);
        linear_bwd(
            dy,
            x,
            &w[r0 * inp..r1 * inp],
            rows,
            inp,
            out,
            dx.as_deref_mut(),
            &mut g.weight[r0 * inp..r1 * inp],
            g.bias.map(|b| &mut b[r0..r1]),
        );
        Ok(dx)
    }

    fn rmsnorm_fwd(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dim: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut y, mut rstd) = (vec![0.0; x.len()], vec![0.0; x.len() / dim]);
        rmsnorm_fwd(x, w, dim, eps, &mut y, &mut rstd);
        Ok((y, rstd))
    }

    fn rmsnorm_bwd(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        dim: usize,
        dw: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let mut dx = vec![0.0; x.len()];
        rmsnorm_bwd(dy, x, w, rstd, dim, &mut dx, dw);
        Ok(dx)
    }

    fn swiglu_fwd(&self, gate: &Vec<f32>, up: &Vec<f32>) -> Result<Vec<f32>> {
        let mut act = vec![0.0; gate.len()];
        swiglu_fwd(gate, up, &mut act);
        Ok(act)
    }

    fn swiglu_bwd(
        &self,
        d_act: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut dg, mut du) = (vec![0.0; gate.len()], vec![0.0; up.len()]);
        swiglu_bwd(d_act, gate, up, &mut dg, &mut du);
        Ok((dg, du))
    }

    fn gelu_fwd(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        let mut y = vec![0.0; x.len()];
        gelu_fwd(x, &mut y);
        Ok(y)
    }

    fn gelu_bwd(&self, dy: &Vec<f32>, x: &Vec<f32>) -> Result<Vec<f32>> {
        let mut dx = vec![0.0; x.len()];
        gelu_bwd(dy, x, &mut dx);
        Ok(dx)
    }

    fn add_into(&self, acc: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        add_inplace(acc, x);
        Ok(())
    }

    fn rope_apply(
        &self,
        rope: &RopeTable<f32>,
        x: &Vec<f32>,
        heads: usize,
        backward: bool,
    ) -> Result<Vec<f32>> {
        let mut y = vec![0.0; x.len()];
        if backward {
            rope_bwd(rope, x, heads, &mut y);
        } else {
            rope_fwd(rope, x, heads, &mut y);
        }
        Ok(y)
    }

    fn attention_fwd(
        &self,
        spec: &AttnSpec,
        cu: &Vec<i32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut o, mut lse) = (vec![0.0; q.len()], vec![0.0; q.len() / spec.head_dim]);
        attention_fwd(&spec.over(cu), q, k, v, &mut o, &mut lse)?;
        Ok((o, lse))
    }

    fn attention_bwd(
        &self,
        spec: &AttnSpec,
        cu: &Vec<i32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        o: &Vec<f32>,
        lse: &Vec<f32>,
        d_o: &Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_bwd(
            &spec.over(cu),
            q,
            k,
            v,
            o,
            lse,
            d_o,
            &mut dq,
            &mut dk,
            &mut dv,
        )?;
        Ok((dq, dk, dv))
    }

    fn paged_attention(
        &self,
        shape: &PagedShape,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        tables: &Vec<i32>,
        stride: usize,
        lens: &Vec<i32>,
    ) -> Result<Vec<f32>> {
        let rows: Vec<Vec<usize>> = lens
            .iter()
            .enumerate()
            .map(|(b, &len)| {
                let used = (len as usize).div_ceil(shape.block_size);
                tables[b * stride..b * stride + used]
                    .iter()
                    .map(|&t| t as usize)
                    .collect()
            })
            .collect();
        let seqs: Vec<PagedSeq> = rows
            .iter()
            .zip(lens)
            .map(|(table, &len)| PagedSeq {
                block_table: table,
                len: len as usize,
            })
            .collect();
        let mut o = vec![0.0; q.len()];
        paged_decode_attention(shape, q, k_cache, v_cache, &seqs, &mut o);
        Ok(o)
    }

    fn embedding_fwd(&self, ids: &Vec<u32>, table: &Vec<f32>, dim: usize) -> Result<Vec<f32>> {
        let mut x = vec![0.0; ids.len() * dim];
        embedding_fwd(ids, table, dim, &mut x)?;
        Ok(x)
    }

    fn embedding_bwd(
        &self,
        ids: &Vec<u32>,
        d_out: &Vec<f32>,
        dim: usize,
        d_table: &mut Vec<f32>,
    ) -> Result<()> {
        embedding_bwd(ids, d_out, dim, d_table)?;
        Ok(())
    }

    fn gather_rows(&self, src: &Vec<f32>, idx: &Vec<i32>, width: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0; idx.len() * width];
        gather_rows(src, idx, width, &mut out);
        Ok(out)
    }

    fn scatter_rows(
        &self,
        src: &Vec<f32>,
        idx: &Vec<i32>,
        width: usize,
        dst: &mut Vec<f32>,
    ) -> Result<()> {
        scatter_rows(src, idx, width, dst);
        Ok(())
    }

    fn token_logprob_fwd(
        &self,
        logits: &Vec<f32>,
        vocab: usize,
        targets: &Vec<u32>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let n = targets.len();
        let (mut logp, mut ent, mut lse) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        token_logprob_fwd(logits, vocab, targets, &mut logp, &mut ent, &mut lse)?;
        Ok((logp, ent, lse))
    }

    fn token_logprob_bwd(
        &self,
        logits: &Vec<f32>,
        vocab: usize,
        targets: &Vec<u32>,
        lse: &Vec<f32>,
        entropy: &Vec<f32>,
        d_logp: &Vec<f32>,
        d_entropy: &Vec<f32>,
    ) -> Result<Vec<f32>> {
        let mut d_logits = vec![0.0; logits.len()];
        token_logprob_bwd(
            logits,
            vocab,
            targets,
            lse,
            entropy,
            d_logp,
            d_entropy,
            &mut d_logits,
        );
        Ok(d_logits)
    }

    fn softmax_kl_fwd(&self, a: &Vec<f32>, b: &Vec<f32>, vocab: usize) -> Result<Vec<f32>> {
        let rows = a.len() / vocab.max(1);
        let (mut kl, mut lse_a, mut lse_b) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
        softmax_kl_fwd(a, b, vocab, &mut kl, &mut lse_a, &mut lse_b);
        Ok(kl)
    }

    fn sample(
        &self,
        logits: &Vec<f32>,
        vocab: usize,
        params: &SamplingParams,
        banned: &[u32],
        uniforms: &[f32],
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        assert_eq!(
            logits.len(),
            uniforms.len() * vocab,
            "sample: one uniform per row"
        );
        let pick = |(row, &u): (&[f32], &f32)| sample_row(row, params, banned, u);
        // Top-p sorts each row: worth threads on real vocabularies only.
        Ok(if logits.len() < PARALLEL_MIN_ELEMS {
            logits.chunks(vocab.max(1)).zip(uniforms).map(pick).unzip()
        } else {
            logits
                .par_chunks(vocab.max(1))
                .zip(uniforms.par_iter())
                .map(pick)
                .unzip()
        })
    }

    fn patch_embed(
        &self,
        geom: &PatchGeometry,
        lut: &[[f32; 256]; 3],
        image: &[u8],
        width: usize,
        height: usize,
        mask: Option<(u64, f64)>,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        Ok(patch_embed(geom, lut, image, width, height, mask))
    }

    fn grad_norm(&self, grads: &[Vec<f32>]) -> Result<f64> {
        let views: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        Ok(global_grad_norm(&views))
    }

    fn adamw_step(
        &self,
        cfg: &AdamWConfig,
        step: u64,
        grad_scale: f32,
        params: &mut [Vec<f32>],
        grads: &[Vec<f32>],
        exp_avg: &mut [Vec<f32>],
        exp_avg_sq: &mut [Vec<f32>],
        copies: Option<&mut [Vec<f32>]>,
    ) -> Result<()> {
        // The copies are this backend's f32 buffers: they get the params.
        let mut copies = copies.map(|c| c.iter_mut());
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(exp_avg).zip(exp_avg_sq) {
            if grad_scale == 1.0 {
                adamw_step(cfg, step, p, g, m, v, None);
            } else {
                let scaled: Vec<f32> = g.iter().map(|&x| x * grad_scale).collect();
                adamw_step(cfg, step, p, &scaled, m, v, None);
            }
            if let Some(copy) = copies.as_mut().and_then(|c| c.next()) {
                copy.copy_from_slice(p);
            }
        }
        Ok(())
    }
}

/// Samples `row` with the `banned` ids removed; the log-prob is under the
/// full distribution, as scoring the token gives it.
pub fn sample_row(row: &[f32], params: &SamplingParams, banned: &[u32], u: f32) -> (u32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|&z| (z - max).exp()).sum::<f32>().ln();
    let mut allowed = row.to_vec();
    for &id in banned {
        if let Some(z) = allowed.get_mut(id as usize) {
            *z = f32::NEG_INFINITY;
        }
    }
    let (tok, _) = sample_token_with_uniform(&allowed, params, u);
    (tok, row[tok as usize] - lse)
}
