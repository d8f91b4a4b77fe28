//! The CPU twin of bf16 mixed precision: [`Backend`] over buffers that know
//! their [`DType`], each op the fp32 CPU op (`super::cpu`) on the stored
//! values with its outputs rounded to bf16 where the storage rules of
//! [`DType`] put bf16 (round-to-nearest-even, as the CUDA kernels write).
//! A bf16 buffer holds f32 values that are all bf16-representable, so
//! reading it is exact and every rounding happens where the device rounds:
//! this is the oracle of the device's bf16 graph. With only f32 buffers it
//! computes exactly what `CpuBackend` does.

use super::cpu::CpuBackend;
use super::{Backend, Buffer, DType, Result, WeightGrads, WeightRows};
use crate::backend::cpu::rope::RopeTable;
use crate::backend::cpu::rows::PARALLEL_MIN_ELEMS;
use crate::backend::desc::{
    AdamWConfig, AttnSpec, PagedShape, PatchGeometry, RopeFreqs, SamplingParams,
};
use half::bf16;
use rayon::prelude::*;
use std::borrow::Cow;

/// A CPU buffer in its dtype: with `Bf16`, every value is a bf16 value.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuBuf {
    data: Vec<f32>,
    dtype: DType,
}

impl Buffer for CpuBuf {
    fn len(&self) -> usize {
        self.data.len()
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

impl CpuBuf {
    /// `data` stored as `dtype` (rounded when bf16).
    pub fn new(mut data: Vec<f32>, dtype: DType) -> Self {
        if dtype == DType::Bf16 {
            round_to_bf16(&mut data);
        }
        Self { data, dtype }
    }

    pub fn f32(data: Vec<f32>) -> Self {
        Self::new(data, DType::F32)
    }

    /// The stored values (exact: bf16 values widen to f32 without loss).
    pub fn values(&self) -> &[f32] {
        &self.data
    }

    /// The values as `dtype` would store them (an op reads its inputs in
    /// the dtype it computes in, as the device converts them).
    #[allow(clippy::owned_cow)] // the fp32 backend's ops take `&Vec<f32>`
    fn as_dtype(&self, dtype: DType) -> Cow<'_, Vec<f32>> {
        if dtype == DType::Bf16 && self.dtype == DType::F32 {
            let mut v = self.data.clone();
            round_to_bf16(&mut v);
            Cow::Owned(v)
        } else {
            Cow::Borrowed(&self.data)
        }
    }
}

/// Rounds every value to its nearest bf16 (ties to even), in place.
pub fn round_to_bf16(v: &mut [f32]) {
    let round = |x: &mut f32| *x = bf16::from_f32(*x).to_f32();
    if v.len() < PARALLEL_MIN_ELEMS {
        v.iter_mut().for_each(round);
    } else {
        v.par_iter_mut().for_each(round);
    }
}

/// The CPU backend with per-buffer storage (stateless, like `CpuBackend`).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBf16Backend;

const FP32: CpuBackend = CpuBackend;

/// `data` in `dtype`.
fn out(data: Vec<f32>, dtype: DType) -> CpuBuf {
    CpuBuf::new(data, dtype)
}

/// An f32 statistic (rstd, lse, log-probs, KL).
fn stat(data: Vec<f32>) -> CpuBuf {
    CpuBuf::f32(data)
}

/// Runs `f` on `dst`'s values and rounds them back to its dtype.
fn update(dst: &mut CpuBuf, f: impl FnOnce(&mut Vec<f32>) -> Result<()>) -> Result<()> {
    f(&mut dst.data)?;
    if dst.dtype == DType::Bf16 {
        round_to_bf16(&mut dst.data);
    }
    Ok(())
}

impl Backend for CpuBf16Backend {
    type Buf = CpuBuf;
    type Index = Vec<i32>;
    type Ids = Vec<u32>;
    type Rope = RopeTable<f32>;
    type Seqlens = Vec<i32>;
    type Graph = std::convert::Infallible;

    fn upload(&self, host: &[f32]) -> Result<CpuBuf> {
        Ok(CpuBuf::f32(host.to_vec()))
    }

    fn download(&self, buf: &CpuBuf) -> Result<Vec<f32>> {
        Ok(buf.data.clone())
    }

    fn zeros(&self, len: usize) -> Result<CpuBuf> {
        Ok(CpuBuf::f32(vec![0.0; len]))
    }

    fn cast(&self, buf: &CpuBuf, dtype: DType) -> Result<CpuBuf> {
        Ok(out(buf.data.clone(), dtype))
    }

    fn copy(&self, buf: &CpuBuf) -> Result<CpuBuf> {
        Ok(buf.clone())
    }

    /// In the first part's dtype.
    fn concat(&self, parts: &[&CpuBuf]) -> Result<CpuBuf> {
        let dtype = parts.first().map_or(DType::F32, |p| p.dtype);
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Ok(out(data, dtype))
    }

    fn fill_zero(&self, buf: &mut CpuBuf) -> Result<()> {
        buf.data.fill(0.0);
        Ok(())
    }

    fn write(&self, dst: &mut CpuBuf, host: &[f32]) -> Result<()> {
        update(dst, |d| {
            d.copy_from_slice(host);
            Ok(())
        })
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
        FP32.rope(freqs, streams)
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
        FP32.write_index(dst, host)
    }

    fn write_ids(&self, dst: &mut Vec<u32>, host: &[u32]) -> Result<()> {
        FP32.write_ids(dst, host)
    }

    fn write_rope(
        &self,
        rope: &mut RopeTable<f32>,
        freqs: &RopeFreqs,
        streams: &[&[i32]],
    ) -> Result<()> {
        FP32.write_rope(rope, freqs, streams)
    }

    fn copy_into(&self, dst: &mut CpuBuf, src: &CpuBuf) -> Result<()> {
        assert_eq!(dst.dtype, src.dtype, "copy_into: storage differs");
        assert_eq!(dst.data.len(), src.data.len(), "copy_into: lengths differ");
        dst.clone_from(src);
        Ok(())
    }

    fn linear_fwd(
        &self,
        x: &CpuBuf,
        rows: usize,
        inp: usize,
        w: &WeightRows<'_, CpuBuf>,
    ) -> Result<CpuBuf> {
        let dtype = w.weight.dtype;
        let x = x.as_dtype(dtype);
        let bias = w.bias.map(|b| b.as_dtype(dtype));
        let w32 = WeightRows {
            weight: &w.weight.data,
            bias: bias.as_deref(),
            rows: w.rows.clone(),
        };
        Ok(out(FP32.linear_fwd(&x, rows, inp, &w32)?, dtype))
    }

    fn linear_bwd(
        &self,
        dy: &CpuBuf,
        x: &CpuBuf,
        rows: usize,
        inp: usize,
        w: &CpuBuf,
        mut g: WeightGrads<'_, CpuBuf>,
        want_dx: bool,
    ) -> Result<Option<CpuBuf>> {
        let dtype = w.dtype;
        let (dy, x) = (dy.as_dtype(dtype), x.as_dtype(dtype));
        let dx = {
            let g32 = WeightGrads {
                weight: &mut g.weight.data,
                bias: g.bias.as_mut().map(|b| &mut b.data),
                rows: g.rows.clone(),
            };
            FP32.linear_bwd(&dy, &x, rows, inp, &w.data, g32, want_dx)?
        };
        // Parameter gradients keep their buffers' dtype (f32 when training).
        for grad in std::iter::once(g.weight).chain(g.bias) {
            update(grad, |_| Ok(()))?;
        }
        Ok(dx.map(|dx| out(dx, dtype)))
    }

    fn rmsnorm_fwd(
        &self,
        x: &CpuBuf,
        w: &CpuBuf,
        dim: usize,
        eps: f32,
    ) -> Result<(CpuBuf, CpuBuf)> {
        let w = w.as_dtype(x.dtype);
        let (y, rstd) = FP32.rmsnorm_fwd(&x.data, &w, dim, eps)?;
        Ok((out(y, x.dtype), stat(rstd)))
    }

    fn rmsnorm_bwd(
        &self,
        dy: &CpuBuf,
        x: &CpuBuf,
        w: &CpuBuf,
        rstd: &CpuBuf,
        dim: usize,
        dw: &mut CpuBuf,
    ) -> Result<CpuBuf> {
        let (x, w) = (x.as_dtype(dy.dtype), w.as_dtype(dy.dtype));
        let mut dx = None;
        update(dw, |dw| {
            dx = Some(FP32.rmsnorm_bwd(&dy.data, &x, &w, &rstd.data, dim, dw)?);
            Ok(())
        })?;
        Ok(out(dx.expect("set above"), dy.dtype))
    }

    fn swiglu_fwd(&self, gate: &CpuBuf, up: &CpuBuf) -> Result<CpuBuf> {
        let up = up.as_dtype(gate.dtype);
        Ok(out(FP32.swiglu_fwd(&gate.data, &up)?, gate.dtype))
    }

    fn swiglu_bwd(&self, d_act: &CpuBuf, gate: &CpuBuf, up: &CpuBuf) -> Result<(CpuBuf, CpuBuf)> {
        let (gate, up) = (gate.as_dtype(d_act.dtype), up.as_dtype(d_act.dtype));
        let (dg, du) = FP32.swiglu_bwd(&d_act.data, &gate, &up)?;
        Ok((out(dg, d_act.dtype), out(du, d_act.dtype)))
    }

    fn gelu_fwd(&self, x: &CpuBuf) -> Result<CpuBuf> {
        Ok(out(FP32.gelu_fwd(&x.data)?, x.dtype))
    }

    fn gelu_bwd(&self, dy: &CpuBuf, x: &CpuBuf) -> Result<CpuBuf> {
        let x = x.as_dtype(dy.dtype);
        Ok(out(FP32.gelu_bwd(&dy.data, &x)?, dy.dtype))
    }

    fn add_into(&self, acc: &mut CpuBuf, x: &CpuBuf) -> Result<()> {
        let x = x.as_dtype(acc.dtype);
        update(acc, |acc| FP32.add_into(acc, &x))
    }

    fn rope_apply(
        &self,
        rope: &RopeTable<f32>,
        x: &CpuBuf,
        heads: usize,
        backward: bool,
    ) -> Result<CpuBuf> {
        Ok(out(
            FP32.rope_apply(rope, &x.data, heads, backward)?,
            x.dtype,
        ))
    }

    fn attention_fwd(
        &self,
        spec: &AttnSpec,
        cu: &Vec<i32>,
        q: &CpuBuf,
        k: &CpuBuf,
        v: &CpuBuf,
    ) -> Result<(CpuBuf, CpuBuf)> {
        let (k, v) = (k.as_dtype(q.dtype), v.as_dtype(q.dtype));
        let (o, lse) = FP32.attention_fwd(spec, cu, &q.data, &k, &v)?;
        Ok((out(o, q.dtype), stat(lse)))
    }

    fn attention_bwd(
        &self,
        spec: &AttnSpec,
        cu: &Vec<i32>,
        q: &CpuBuf,
        k: &CpuBuf,
        v: &CpuBuf,
        o: &CpuBuf,
        lse: &CpuBuf,
        d_o: &CpuBuf,
    ) -> Result<(CpuBuf, CpuBuf, CpuBuf)> {
        let dtype = d_o.dtype;
        let [q, k, v, o] = [q, k, v, o].map(|b| b.as_dtype(dtype));
        let (dq, dk, dv) = FP32.attention_bwd(spec, cu, &q, &k, &v, &o, &lse.data, &d_o.data)?;
        Ok((out(dq, dtype), out(dk, dtype), out(dv, dtype)))
    }

    fn paged_attention(
        &self,
        shape: &PagedShape,
        q: &CpuBuf,
        k_cache: &CpuBuf,
        v_cache: &CpuBuf,
        tables: &Vec<i32>,
        stride: usize,
        lens: &Vec<i32>,
    ) -> Result<CpuBuf> {
        // In the caches' dtype; the output in the query's.
        let cache = k_cache.dtype;
        let (qc, vc) = (q.as_dtype(cache), v_cache.as_dtype(cache));
        let o = FP32.paged_attention(shape, &qc, &k_cache.data, &vc, tables, stride, lens)?;
        Ok(out(o, q.dtype))
    }

    fn embedding_fwd(&self, ids: &Vec<u32>, table: &CpuBuf, dim: usize) -> Result<CpuBuf> {
        Ok(out(FP32.embedding_fwd(ids, &table.data, dim)?, table.dtype))
    }

    fn embedding_bwd(
        &self,
        ids: &Vec<u32>,
        d_out: &CpuBuf,
        dim: usize,
        d_table: &mut CpuBuf,
    ) -> Result<()> {
        update(d_table, |t| FP32.embedding_bwd(ids, &d_out.data, dim, t))
    }

    fn gather_rows(&self, src: &CpuBuf, idx: &Vec<i32>, width: usize) -> Result<CpuBuf> {
        Ok(out(FP32.gather_rows(&src.data, idx, width)?, src.dtype))
    }

    fn scatter_rows(
        &self,
        src: &CpuBuf,
        idx: &Vec<i32>,
        width: usize,
        dst: &mut CpuBuf,
    ) -> Result<()> {
        update(dst, |d| FP32.scatter_rows(&src.data, idx, width, d))
    }

    fn token_logprob_fwd(
        &self,
        logits: &CpuBuf,
        vocab: usize,
        targets: &Vec<u32>,
    ) -> Result<(CpuBuf, CpuBuf, CpuBuf)> {
        let (logp, ent, lse) = FP32.token_logprob_fwd(&logits.data, vocab, targets)?;
        Ok((stat(logp), stat(ent), stat(lse)))
    }

    fn token_logprob_bwd(
        &self,
        logits: &CpuBuf,
        vocab: usize,
        targets: &Vec<u32>,
        lse: &CpuBuf,
        entropy: &CpuBuf,
        d_logp: &CpuBuf,
        d_entropy: &CpuBuf,
    ) -> Result<CpuBuf> {
        let d_logits = FP32.token_logprob_bwd(
            &logits.data,
            vocab,
            targets,
            &lse.data,
            &entropy.data,
            &d_logp.data,
            &d_entropy.data,
        )?;
        Ok(out(d_logits, logits.dtype))
    }

    fn softmax_kl_fwd(&self, a: &CpuBuf, b: &CpuBuf, vocab: usize) -> Result<CpuBuf> {
        Ok(stat(FP32.softmax_kl_fwd(&a.data, &b.data, vocab)?))
    }

    fn sample(
        &self,
        logits: &CpuBuf,
        vocab: usize,
        params: &SamplingParams,
        banned: &[u32],
        uniforms: &[f32],
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        FP32.sample(&logits.data, vocab, params, banned, uniforms)
    }

    fn patch_embed(
        &self,
        geom: &PatchGeometry,
        lut: &[[f32; 256]; 3],
        image: &[u8],
        width: usize,
        height: usize,
        mask: Option<(u64, f64)>,
    ) -> Result<(CpuBuf, Option<CpuBuf>)> {
        let (pixels, masked) = FP32.patch_embed(geom, lut, image, width, height, mask)?;
        Ok((stat(pixels), masked.map(stat)))
    }

    fn grad_norm(&self, grads: &[CpuBuf]) -> Result<f64> {
        let views: Vec<&[f32]> = grads.iter().map(|g| g.data.as_slice()).collect();
        Ok(crate::backend::cpu::adamw::global_grad_norm(&views))
    }

    fn adamw_step(
        &self,
        cfg: &AdamWConfig,
        step: u64,
        grad_scale: f32,
        params: &mut [CpuBuf],
        grads: &[CpuBuf],
        exp_avg: &mut [CpuBuf],
        exp_avg_sq: &mut [CpuBuf],
        copies: Option<&mut [CpuBuf]>,
    ) -> Result<()> {
        let mut copies = copies.map(|c| c.iter_mut());
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(exp_avg).zip(exp_avg_sq) {
            let scaled: Cow<'_, [f32]> = if grad_scale == 1.0 {
                Cow::Borrowed(&g.data)
            } else {
                Cow::Owned(g.data.iter().map(|&x| x * grad_scale).collect())
            };
            let copy = copies.as_mut().and_then(|c| c.next());
            match copy {
                Some(copy) if copy.dtype == DType::Bf16 => {
                    // The master and its bf16 copy in one pass, as the kernel.
                    let mut rounded = vec![bf16::ZERO; p.data.len()];
                    crate::backend::cpu::adamw::adamw_step(
                        cfg,
                        step,
                        &mut p.data,
                        &scaled,
                        &mut m.data,
                        &mut v.data,
                        Some(&mut rounded),
                    );
                    for (c, r) in copy.data.iter_mut().zip(&rounded) {
                        *c = r.to_f32();
                    }
                }
                copy => {
                    crate::backend::cpu::adamw::adamw_step(
                        cfg,
                        step,
                        &mut p.data,
                        &scaled,
                        &mut m.data,
                        &mut v.data,
                        None,
                    );
                    if let Some(copy) = copy {
                        copy.data.copy_from_slice(&p.data);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_buffers_round_to_nearest_even_on_every_write() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even
        // give 1.0; 1 + 3*2^-8 ties up to 1 + 2^-6.
        let b = CpuBuf::new(vec![1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, 0.1], DType::Bf16);
        assert_eq!(b.values()[..2], [1.0, 1.0 + 1.0 / 64.0]);
        assert_ne!(b.values()[2], 0.1);
        assert_eq!(b.values()[2], bf16::from_f32(0.1).to_f32());
        let be = CpuBf16Backend;
        let mut acc = CpuBuf::new(vec![1.0], DType::Bf16);
        be.add_into(&mut acc, &CpuBuf::f32(vec![1.0 / 512.0]))
            .unwrap();
        assert_eq!(acc.values(), [1.0], "the sum is rounded back to bf16");
        let mut acc32 = CpuBuf::f32(vec![1.0]);
        be.add_into(&mut acc32, &CpuBuf::f32(vec![1.0 / 512.0]))
            .unwrap();
        assert_eq!(acc32.values(), [1.0 + 1.0 / 512.0]);
    }

    #[test]
    fn a_linear_layer_computes_in_its_weight_dtype() {
        let be = CpuBf16Backend;
        let x = CpuBuf::f32(vec![1.001, 2.0]);
        let w = CpuBuf::new(vec![0.3, 0.7], DType::Bf16);
        let rows = WeightRows {
            weight: &w,
            bias: None,
            rows: 0..1,
        };
        let y = be.linear_fwd(&x, 1, 2, &rows).unwrap();
        assert_eq!(y.dtype(), DType::Bf16);
        // x rounded to bf16 first, the dot in f32, the result rounded.
        let xr = bf16::from_f32(1.001).to_f32();
        let want = bf16::from_f32(xr * w.values()[0] + 2.0 * w.values()[1]).to_f32();
        assert_eq!(y.values(), [want]);
    }
}
