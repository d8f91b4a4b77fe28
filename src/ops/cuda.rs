//! [`Backend`] on a CUDA device: each op is one or two launchers of
//! `backend::cuda` (our kernels, cuBLASLt GEMMs), on the device's stream.
//! Buffers come from the stream-ordered pool (cudarc's async allocation),
//! so the graph's per-op outputs cost no device synchronisation.

use super::{Backend, Buffer, DType, Error, Result, WeightGrads, WeightRows};
use crate::backend::cuda::{
    AdamWTensor, CudaBackend, CudaError, FlashAttnShape, GemmShape, LogitChunk, PatchMask,
    RopeFreqsDevice, Trans, LOGPROB_STATE_PER_ROW,
};
use crate::backend::desc::{
    AdamWConfig, AttnSpec, PagedShape, PatchGeometry, RopeFreqs, SamplingParams,
};
use cudarc::driver::{CudaSlice, CudaView};
use half::bf16;

/// A device buffer: its elements (their count may be 0 while the
/// allocation holds at least one, as CUDA allocations cannot be empty) and
/// their type.
pub struct DeviceBuf {
    len: usize,
    storage: Storage,
}

/// The allocation behind a [`DeviceBuf`].
pub enum Storage {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl Buffer for DeviceBuf {
    fn len(&self) -> usize {
        self.len
    }
    fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::Bf16(_) => DType::Bf16,
        }
    }
}

impl DeviceBuf {
    /// `len` f32 elements in `data` (which holds at least that many).
    pub fn from_f32(data: CudaSlice<f32>, len: usize) -> Self {
        debug_assert!(data.len() >= len);
        Self {
            len,
            storage: Storage::F32(data),
        }
    }

    /// The f32 storage; the graph's ops run on fp32 buffers for now.
    pub fn f32(&self) -> Result<&CudaSlice<f32>> {
        match &self.storage {
            Storage::F32(s) => Ok(s),
            Storage::Bf16(_) => Err(bf16_unsupported()),
        }
    }

    pub fn f32_mut(&mut self) -> Result<&mut CudaSlice<f32>> {
        match &mut self.storage {
            Storage::F32(s) => Ok(s),
            Storage::Bf16(_) => Err(bf16_unsupported()),
        }
    }
}

fn bf16_unsupported() -> Error {
    Error::Device(CudaError::Unsupported {
        kernel: "op layer",
        reason: "bf16 buffers are not wired into the graph's ops yet".into(),
    })
}

/// Host values with their device copy: the index arrays and ids the ops
/// read on the device and check (or size launches) on the host.
pub struct Mirrored<T> {
    pub host: Vec<T>,
    pub dev: CudaSlice<T>,
}

/// Rotary frequencies and positions on the device.
pub struct DeviceRope {
    freqs: RopeFreqsDevice,
    /// `[streams, tokens]`.
    positions: CudaSlice<i32>,
    tokens: usize,
}

fn zeros_f32(gpu: &CudaBackend, n: usize) -> Result<CudaSlice<f32>> {
    Ok(gpu.stream().alloc_zeros::<f32>(n.max(1))?)
}

/// A buffer over a whole allocation of `n` elements made by [`zeros_f32`].
fn buf(data: CudaSlice<f32>, n: usize) -> DeviceBuf {
    DeviceBuf::from_f32(data, n)
}

impl CudaBackend {
    fn mirrored<T>(&self, host: &[T]) -> Result<Mirrored<T>>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Clone,
    {
        let dev = if host.is_empty() {
            self.stream().alloc_zeros::<T>(1)?
        } else {
            self.stream().clone_htod(host)?
        };
        Ok(Mirrored {
            host: host.to_vec(),
            dev,
        })
    }

    fn new_buf(&self, n: usize) -> Result<DeviceBuf> {
        Ok(buf(zeros_f32(self, n)?, n))
    }
}

/// The first `n` elements of a buffer, as cudarc views.
fn view(s: &CudaSlice<f32>, n: usize) -> CudaView<'_, f32> {
    s.slice(0..n)
}

impl Backend for CudaBackend {
    type Buf = DeviceBuf;
    type Index = Mirrored<i32>;
    type Ids = Mirrored<u32>;
    type Rope = DeviceRope;
    type Seqlens = Mirrored<i32>;

    fn upload(&self, host: &[f32]) -> Result<DeviceBuf> {
        if host.is_empty() {
            return self.new_buf(0);
        }
        Ok(buf(self.stream().clone_htod(host)?, host.len()))
    }

    fn download(&self, src: &DeviceBuf) -> Result<Vec<f32>> {
        if src.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.stream().clone_dtoh(&view(src.f32()?, src.len()))?)
    }

    fn zeros(&self, len: usize) -> Result<DeviceBuf> {
        self.new_buf(len)
    }

    fn copy(&self, src: &DeviceBuf) -> Result<DeviceBuf> {
        Ok(buf(self.stream().clone_dtod(src.f32()?)?, src.len()))
    }

    fn concat(&self, parts: &[&DeviceBuf]) -> Result<DeviceBuf> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = zeros_f32(self, total)?;
        let mut at = 0;
        for p in parts {
            let n = p.len();
            if n > 0 {
                self.stream()
                    .memcpy_dtod(&view(p.f32()?, n), &mut out.slice_mut(at..at + n))?;
            }
            at += n;
        }
        Ok(buf(out, total))
    }

    fn fill_zero(&self, buf: &mut DeviceBuf) -> Result<()> {
        self.stream().memset_zeros(buf.f32_mut()?)?;
        Ok(())
    }

    fn write(&self, dst: &mut DeviceBuf, host: &[f32]) -> Result<()> {
        assert_eq!(dst.len(), host.len(), "write: lengths differ");
        if !host.is_empty() {
            self.stream()
                .memcpy_htod(host, &mut dst.f32_mut()?.slice_mut(0..host.len()))?;
        }
        Ok(())
    }

    fn index(&self, host: &[i32]) -> Result<Mirrored<i32>> {
        self.mirrored(host)
    }

    fn ids(&self, host: &[u32]) -> Result<Mirrored<u32>> {
        self.mirrored(host)
    }

    fn seqlens(&self, cu: &[i32]) -> Result<Mirrored<i32>> {
        self.mirrored(cu)
    }

    fn rope(&self, freqs: &RopeFreqs, streams: &[&[i32]]) -> Result<DeviceRope> {
        let tokens = streams.first().map_or(0, |s| s.len());
        let flat: Vec<i32> = streams.concat();
        Ok(DeviceRope {
            freqs: self.rope_freqs(freqs)?,
            positions: self.mirrored(&flat)?.dev,
            tokens,
        })
    }

    fn synchronize(&self) -> Result<()> {
        self.stream().synchronize()?;
        Ok(())
    }

    fn free_memory(&self) -> Option<usize> {
        self.context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free)
    }

    fn linear_fwd(
        &self,
        x: &DeviceBuf,
        rows: usize,
        inp: usize,
        w: &WeightRows<'_, DeviceBuf>,
    ) -> Result<DeviceBuf> {
        let out = w.rows.len();
        let mut y = zeros_f32(self, rows * out)?;
        if rows * out == 0 {
            return Ok(buf(y, rows * out));
        }
        let wv = w.weight.f32()?.slice(w.rows.start * inp..w.rows.end * inp);
        let bias = match w.bias {
            Some(b) => Some(b.f32()?.slice(w.rows.clone())),
            None => None,
        };
        self.gemm(
            &GemmShape::linear(rows, inp, out),
            1.0,
            &view(x.f32()?, rows * inp),
            &wv,
            0.0,
            &mut y.slice_mut(0..rows * out),
            bias.as_ref(),
        )?;
        Ok(buf(y, rows * out))
    }

    fn linear_bwd(
        &self,
        dy: &DeviceBuf,
        x: &DeviceBuf,
        rows: usize,
        inp: usize,
        w: &DeviceBuf,
        g: WeightGrads<'_, DeviceBuf>,
        want_dx: bool,
    ) -> Result<Option<DeviceBuf>> {
        let (r0, r1) = (g.rows.start, g.rows.end);
        let out = r1 - r0;
        let dy_v = view(dy.f32()?, rows * out);
        let w_rows = r0 * inp..r1 * inp;
        let dx = if want_dx {
            let mut dx = zeros_f32(self, rows * inp)?;
            if rows * inp * out > 0 {
                let shape = GemmShape {
                    m: rows,
                    k: out,
                    n: inp,
                    trans_a: Trans::No,
                    trans_b: Trans::No,
                };
                self.gemm(
                    &shape,
                    1.0,
                    &dy_v,
                    &w.f32()?.slice(w_rows.clone()),
                    0.0,
                    &mut dx.slice_mut(0..rows * inp),
                    None,
                )?;
            }
            Some(buf(dx, rows * inp))
        } else {
            None
        };
        if rows == 0 {
            return Ok(dx);
        }
        let dw_shape = GemmShape {
            m: out,
            k: rows,
            n: inp,
            trans_a: Trans::Yes,
            trans_b: Trans::No,
        };
        self.gemm(
            &dw_shape,
            1.0,
            &dy_v,
            &view(x.f32()?, rows * inp),
            1.0,
            &mut g.weight.f32_mut()?.slice_mut(w_rows),
            None,
        )?;
        if let Some(b) = g.bias {
            // db += ones[1, rows] @ dy.
            let ones = self.ones(rows)?;
            let db_shape = GemmShape {
                m: 1,
                k: rows,
                n: out,
                trans_a: Trans::No,
                trans_b: Trans::No,
            };
            self.gemm(
                &db_shape,
                1.0,
                &ones.slice(0..rows),
                &dy_v,
                1.0,
                &mut b.f32_mut()?.slice_mut(r0..r1),
                None,
            )?;
        }
        Ok(dx)
    }

    fn rmsnorm_fwd(
        &self,
        x: &DeviceBuf,
        w: &DeviceBuf,
        dim: usize,
        eps: f32,
    ) -> Result<(DeviceBuf, DeviceBuf)> {
        let rows = x.len() / dim;
        let (mut y, mut rstd) = (zeros_f32(self, rows * dim)?, zeros_f32(self, rows)?);
        CudaBackend::rmsnorm_fwd(self, x.f32()?, w.f32()?, rows, dim, eps, &mut y, &mut rstd)?;
        Ok((buf(y, rows * dim), buf(rstd, rows)))
    }

    fn rmsnorm_bwd(
        &self,
        dy: &DeviceBuf,
        x: &DeviceBuf,
        w: &DeviceBuf,
        rstd: &DeviceBuf,
        dim: usize,
        dw: &mut DeviceBuf,
    ) -> Result<DeviceBuf> {
        let rows = x.len() / dim;
        let mut dx = zeros_f32(self, rows * dim)?;
        CudaBackend::rmsnorm_bwd(
            self,
            dy.f32()?,
            x.f32()?,
            w.f32()?,
            rstd.f32()?,
            rows,
            dim,
            &mut dx,
            dw.f32_mut()?,
        )?;
        Ok(buf(dx, rows * dim))
    }

    fn swiglu_fwd(&self, gate: &DeviceBuf, up: &DeviceBuf) -> Result<DeviceBuf> {
        let n = gate.len();
        let mut h = zeros_f32(self, n)?;
        CudaBackend::swiglu_fwd(self, gate.f32()?, up.f32()?, n, &mut h)?;
        Ok(buf(h, n))
    }

    fn swiglu_bwd(
        &self,
        d_act: &DeviceBuf,
        gate: &DeviceBuf,
        up: &DeviceBuf,
    ) -> Result<(DeviceBuf, DeviceBuf)> {
        let n = gate.len();
        let (mut dg, mut du) = (zeros_f32(self, n)?, zeros_f32(self, n)?);
        CudaBackend::swiglu_bwd(
            self,
            d_act.f32()?,
            gate.f32()?,
            up.f32()?,
            n,
            &mut dg,
            &mut du,
        )?;
        Ok((buf(dg, n), buf(du, n)))
    }

    fn gelu_fwd(&self, x: &DeviceBuf) -> Result<DeviceBuf> {
        let n = x.len();
        let mut y = zeros_f32(self, n)?;
        CudaBackend::gelu_fwd(self, x.f32()?, n, &mut y)?;
        Ok(buf(y, n))
    }

    fn gelu_bwd(&self, dy: &DeviceBuf, x: &DeviceBuf) -> Result<DeviceBuf> {
        let n = x.len();
        let mut dx = zeros_f32(self, n)?;
        CudaBackend::gelu_bwd(self, dy.f32()?, x.f32()?, n, &mut dx)?;
        Ok(buf(dx, n))
    }

    fn add_into(&self, acc: &mut DeviceBuf, x: &DeviceBuf) -> Result<()> {
        let n = x.len();
        assert_eq!(acc.len(), n, "add_into: lengths differ");
        if n == 0 {
            return Ok(());
        }
        let xv = view(x.f32()?, n);
        self.add_inplace(&mut acc.f32_mut()?.slice_mut(0..n), &xv, n)?;
        Ok(())
    }

    fn rope_apply(
        &self,
        rope: &DeviceRope,
        x: &DeviceBuf,
        heads: usize,
        backward: bool,
    ) -> Result<DeviceBuf> {
        let mut y = zeros_f32(self, x.len())?;
        CudaBackend::rope(
            self,
            &rope.freqs,
            &rope.positions,
            rope.tokens,
            heads,
            backward,
            x.f32()?,
            &mut y,
        )?;
        Ok(buf(y, x.len()))
    }

    fn attention_fwd(
        &self,
        spec: &AttnSpec,
        cu: &Mirrored<i32>,
        q: &DeviceBuf,
        k: &DeviceBuf,
        v: &DeviceBuf,
    ) -> Result<(DeviceBuf, DeviceBuf)> {
        let shape = FlashAttnShape::of(&spec.over(&cu.host))?;
        let (mut o, mut lse) = (
            zeros_f32(self, q.len())?,
            zeros_f32(self, q.len() / spec.head_dim)?,
        );
        self.flash_attn_fwd(
            &shape,
            q.f32()?,
            k.f32()?,
            v.f32()?,
            &cu.dev,
            &cu.dev,
            &mut o,
            &mut lse,
        )?;
        Ok((buf(o, q.len()), buf(lse, q.len() / spec.head_dim)))
    }

    fn attention_bwd(
        &self,
        spec: &AttnSpec,
        cu: &Mirrored<i32>,
        q: &DeviceBuf,
        k: &DeviceBuf,
        v: &DeviceBuf,
        o: &DeviceBuf,
        lse: &DeviceBuf,
        d_o: &DeviceBuf,
    ) -> Result<(DeviceBuf, DeviceBuf, DeviceBuf)> {
        let shape = FlashAttnShape::of(&spec.over(&cu.host))?;
        let mut delta = zeros_f32(self, q.len() / spec.head_dim)?;
        let (mut dq, mut dk, mut dv) = (
            zeros_f32(self, q.len())?,
            zeros_f32(self, k.len())?,
            zeros_f32(self, v.len())?,
        );
        self.flash_attn_bwd(
            &shape,
            q.f32()?,
            k.f32()?,
            v.f32()?,
            o.f32()?,
            lse.f32()?,
            d_o.f32()?,
            &cu.dev,
            &cu.dev,
            &mut delta,
            &mut dq,
            &mut dk,
            &mut dv,
        )?;
        Ok((buf(dq, q.len()), buf(dk, k.len()), buf(dv, v.len())))
    }

    fn paged_attention(
        &self,
        shape: &PagedShape,
        q: &DeviceBuf,
        k_cache: &DeviceBuf,
        v_cache: &DeviceBuf,
        tables: &Mirrored<i32>,
        stride: usize,
        lens: &Mirrored<i32>,
    ) -> Result<DeviceBuf> {
        let mut o = zeros_f32(self, q.len())?;
        self.paged_decode_attention(
            shape,
            lens.host.len(),
            q.f32()?,
            k_cache.f32()?,
            v_cache.f32()?,
            &tables.dev,
            stride,
            &lens.dev,
            &mut o,
        )?;
        Ok(buf(o, q.len()))
    }

    fn embedding_fwd(
        &self,
        ids: &Mirrored<u32>,
        table: &DeviceBuf,
        dim: usize,
    ) -> Result<DeviceBuf> {
        let tokens = ids.host.len();
        let vocab = table.len() / dim;
        if let Some(position) = ids.host.iter().position(|&id| id as usize >= vocab) {
            return Err(crate::backend::cpu::OpError::TokenOutOfRange {
                id: ids.host[position],
                position,
                vocab,
            }
            .into());
        }
        let mut x = zeros_f32(self, tokens * dim)?;
        CudaBackend::embedding_fwd(self, &ids.dev, tokens, table.f32()?, vocab, dim, &mut x)?;
        Ok(buf(x, tokens * dim))
    }

    fn embedding_bwd(
        &self,
        ids: &Mirrored<u32>,
        d_out: &DeviceBuf,
        dim: usize,
        d_table: &mut DeviceBuf,
    ) -> Result<()> {
        CudaBackend::embedding_bwd(self, &ids.host, d_out.f32()?, dim, d_table.f32_mut()?)?;
        Ok(())
    }

    fn gather_rows(&self, src: &DeviceBuf, idx: &Mirrored<i32>, width: usize) -> Result<DeviceBuf> {
        let rows = idx.host.len();
        let mut out = zeros_f32(self, rows * width)?;
        if rows * width > 0 {
            CudaBackend::gather_rows(
                self,
                &src.f32()?.slice(..),
                &idx.dev.slice(..),
                rows,
                width,
                &mut out.slice_mut(..),
            )?;
        }
        Ok(buf(out, rows * width))
    }

    fn scatter_rows(
        &self,
        src: &DeviceBuf,
        idx: &Mirrored<i32>,
        width: usize,
        dst: &mut DeviceBuf,
    ) -> Result<()> {
        let rows = idx.host.len();
        if rows * width == 0 {
            return Ok(());
        }
        CudaBackend::scatter_rows(
            self,
            &src.f32()?.slice(..),
            &idx.dev.slice(..),
            rows,
            width,
            &mut dst.f32_mut()?.slice_mut(..),
        )?;
        Ok(())
    }

    fn token_logprob_fwd(
        &self,
        logits: &DeviceBuf,
        vocab: usize,
        targets: &Mirrored<u32>,
    ) -> Result<(DeviceBuf, DeviceBuf, DeviceBuf)> {
        let rows = targets.host.len();
        let (mut logp, mut ent, mut lse) = (
            zeros_f32(self, rows)?,
            zeros_f32(self, rows)?,
            zeros_f32(self, rows)?,
        );
        if rows > 0 {
            let mut state = zeros_f32(self, rows * LOGPROB_STATE_PER_ROW)?;
            let chunk = whole_vocab(rows, vocab);
            self.logprob_chunk(&chunk, logits.f32()?, &targets.dev, true, &mut state)?;
            self.logprob_finish(&state, rows, &mut logp, &mut ent, &mut lse)?;
        }
        Ok((buf(logp, rows), buf(ent, rows), buf(lse, rows)))
    }

    fn token_logprob_bwd(
        &self,
        logits: &DeviceBuf,
        vocab: usize,
        targets: &Mirrored<u32>,
        lse: &DeviceBuf,
        entropy: &DeviceBuf,
        d_logp: &DeviceBuf,
        d_entropy: &DeviceBuf,
    ) -> Result<DeviceBuf> {
        let rows = targets.host.len();
        let mut d_logits = zeros_f32(self, rows * vocab)?;
        if rows > 0 {
            self.logprob_bwd_chunk(
                &whole_vocab(rows, vocab),
                logits.f32()?,
                &targets.dev,
                lse.f32()?,
                entropy.f32()?,
                d_logp.f32()?,
                d_entropy.f32()?,
                &mut d_logits,
            )?;
        }
        Ok(buf(d_logits, rows * vocab))
    }

    fn softmax_kl_fwd(&self, a: &DeviceBuf, b: &DeviceBuf, vocab: usize) -> Result<DeviceBuf> {
        let rows = a.len() / vocab.max(1);
        let (mut kl, mut lse_a, mut lse_b) = (
            zeros_f32(self, rows)?,
            zeros_f32(self, rows)?,
            zeros_f32(self, rows)?,
        );
        CudaBackend::softmax_kl_fwd(
            self,
            a.f32()?,
            b.f32()?,
            rows,
            vocab,
            &mut kl,
            &mut lse_a,
            &mut lse_b,
        )?;
        Ok(buf(kl, rows))
    }

    fn sample(
        &self,
        logits: &DeviceBuf,
        vocab: usize,
        params: &SamplingParams,
        banned: &[u32],
        uniforms: &[f32],
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let rows = uniforms.len();
        if rows == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let s = self.stream().clone();
        // The banned ids are set to -inf in a copy; the log-prob of the
        // picked token comes from the unmasked logits.
        let mut masked = s.clone_dtod(logits.f32()?)?;
        let ban = ban_indices(rows, vocab, banned);
        if !ban.is_empty() {
            let idx = s.clone_htod(&ban)?;
            let neg = s.clone_htod(&vec![f32::NEG_INFINITY; ban.len()])?;
            CudaBackend::scatter_rows(
                self,
                &neg.slice(..),
                &idx.slice(..),
                ban.len(),
                1,
                &mut masked.slice_mut(..),
            )?;
        }
        let u = s.clone_htod(uniforms)?;
        let mut tokens = s.alloc_zeros::<i32>(rows)?;
        let mut sample_lp = zeros_f32(self, rows)?;
        CudaBackend::sample(
            self,
            &masked,
            rows,
            vocab,
            params,
            &u,
            &mut tokens,
            &mut sample_lp,
        )?;
        let picked: Vec<u32> = s
            .clone_dtoh(&tokens)?
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let targets = self.mirrored(&picked)?;
        let (logp, _, _) = self.token_logprob_fwd(logits, vocab, &targets)?;
        Ok((picked, self.download(&logp)?))
    }

    fn patch_embed(
        &self,
        geom: &PatchGeometry,
        lut: &[[f32; 256]; 3],
        image: &[u8],
        width: usize,
        height: usize,
        mask: Option<(u64, f64)>,
    ) -> Result<(DeviceBuf, Option<DeviceBuf>)> {
        let n = (width / geom.patch.max(1)) * (height / geom.patch.max(1));
        let features = 3 * geom.temporal * geom.patch * geom.patch;
        let lut_dev = self.patch_lut(lut)?;
        let bytes = self.stream().clone_htod(image)?;
        let mut out = zeros_f32(self, n * features)?;
        let mut masked = match mask {
            Some(_) => Some(zeros_f32(self, n * features)?),
            None => None,
        };
        {
            let mut masked_view = masked.as_mut().map(|m| m.slice_mut(..));
            let patch_mask = match (mask, masked_view.as_mut()) {
                (Some((seed, p)), Some(out)) => Some(PatchMask { out, seed, p }),
                _ => None,
            };
            CudaBackend::patch_embed(
                self,
                geom,
                &lut_dev,
                &bytes.slice(..),
                width,
                height,
                &mut out.slice_mut(..),
                patch_mask,
            )?;
        }
        Ok((buf(out, n * features), masked.map(|m| buf(m, n * features))))
    }

    fn grad_norm(&self, grads: &[DeviceBuf]) -> Result<f64> {
        let refs = grads.iter().map(|g| g.f32()).collect::<Result<Vec<_>>>()?;
        Ok(self.global_grad_norm(&refs)?)
    }

    fn adamw_step(
        &self,
        cfg: &AdamWConfig,
        step: u64,
        grad_scale: f32,
        params: &mut [DeviceBuf],
        grads: &[DeviceBuf],
        exp_avg: &mut [DeviceBuf],
        exp_avg_sq: &mut [DeviceBuf],
    ) -> Result<()> {
        let mut tensors = Vec::with_capacity(params.len());
        for (((param, grad), m), v) in params.iter_mut().zip(grads).zip(exp_avg).zip(exp_avg_sq) {
            tensors.push(AdamWTensor {
                param: param.f32_mut()?,
                grad: grad.f32()?,
                exp_avg: m.f32_mut()?,
                exp_avg_sq: v.f32_mut()?,
                model: None,
            });
        }
        CudaBackend::adamw_step(self, cfg, step, grad_scale, &mut tensors)?;
        Ok(())
    }
}

/// One chunk spanning the whole vocabulary.
fn whole_vocab(rows: usize, vocab: usize) -> LogitChunk {
    LogitChunk {
        rows,
        chunk_len: vocab,
        ld: vocab,
        vocab_offset: 0,
    }
}

/// Flat indices `row * vocab + id` of the banned ids of `rows` logit rows
/// (ids outside the vocabulary are skipped, as the CPU does).
pub fn ban_indices(rows: usize, vocab: usize, banned: &[u32]) -> Vec<i32> {
    let ids: Vec<usize> = banned
        .iter()
        .map(|&b| b as usize)
        .filter(|&b| b < vocab)
        .collect();
    (0..rows)
        .flat_map(|r| ids.iter().map(move |&b| (r * vocab + b) as i32))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ban_indices_cover_every_row_and_skip_out_of_vocab_ids() {
        assert_eq!(ban_indices(2, 10, &[3, 12, 7]), vec![3, 7, 13, 17]);
        assert!(ban_indices(3, 10, &[]).is_empty());
    }
}
