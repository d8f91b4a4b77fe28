//! [`Backend`] on a CUDA device: each op is one or two launchers of
//! `backend::cuda` (our kernels, cuBLASLt GEMMs), on the device's stream.
//! Buffers come from the stream-ordered pool (cudarc's async allocation),
//! so the graph's per-op outputs cost no device synchronisation.
//!
//! Buffers are f32 or bf16 ([`DeviceBuf`]); every op follows the storage
//! rules of [`DType`] (the CPU twin `ops::cpu_bf16` follows the same): it
//! picks the storage type it computes in, reads its inputs in that type
//! ([`Held`]: their own storage, or a converted copy), and writes its
//! outputs there. Ops with a bf16 kernel (GEMMs on bf16 tensor cores with
//! fp32 accumulation, RMSNorm, activations, RoPE, attention, rows, the
//! token log-prob head) run it, their statistics in f32; the exact KL and
//! sampling read bf16 logits widened to f32.

use super::device_buf::{alloc, dtype_mismatch, held, ones, store, Held, Stored};
pub use super::device_buf::{DeviceBuf, Storage};
use super::{Backend, Buffer, DType, Result, WeightGrads, WeightRows};
use crate::backend::cuda::{
    flash_tc_supports, paged_tc_plan, paged_tc_scratch_len, paged_tc_supports, AdamWTensor,
    CudaBackend, FlashAttnShape, GemmShape, LogitChunk, PatchMask, RopeFreqsDevice, Trans,
    LOGPROB_STATE_PER_ROW,
};
use crate::backend::desc::{
    AdamWConfig, AttnSpec, PagedShape, PatchGeometry, RopeFreqs, SamplingParams,
};
use cudarc::driver::{CudaSlice, CudaView};
use half::bf16;

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

/// Runs `$body` with `$t` the storage type of `$dtype` (f32 or bf16).
macro_rules! in_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::Bf16 => {
                type $t = bf16;
                $body
            }
        }
    };
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

    /// Records `body` on the stream into an instantiated graph; the capture
    /// ends whatever the body did, so the stream stays usable.
    fn record(&self, body: &mut dyn FnMut() -> Result<()>) -> Result<cudarc::driver::CudaGraph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        let stream = self.stream();
        stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let recorded = body();
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        recorded?;
        Ok(
            graph?.ok_or_else(|| crate::backend::cuda::CudaError::Unsupported {
                kernel: "stream capture",
                reason: "the capture recorded no graph".into(),
            })?,
        )
    }

    /// Overwrites a mirrored array in place (host copy and device copy):
    /// a captured graph keeps reading the same device allocation.
    fn write_mirrored<T>(&self, dst: &mut Mirrored<T>, host: &[T]) -> Result<()>
    where
        T: cudarc::driver::DeviceRepr + Clone,
    {
        assert_eq!(dst.host.len(), host.len(), "write: lengths differ");
        dst.host.clone_from_slice(host);
        if !host.is_empty() {
            self.stream()
                .memcpy_htod(host, &mut dst.dev.slice_mut(0..host.len()))?;
        }
        Ok(())
    }

    fn new_buf(&self, n: usize) -> Result<DeviceBuf> {
        Ok(buf(zeros_f32(self, n)?, n))
    }

    /// `buf` widened to f32 (its own storage when f32).
    fn as_f32<'a>(&self, buf: &'a DeviceBuf) -> Result<Held<'a, f32>> {
        held::<f32>(self, buf)
    }

    fn linear_fwd_in<T: Stored>(
        &self,
        x: &DeviceBuf,
        rows: usize,
        inp: usize,
        w: &WeightRows<'_, DeviceBuf>,
    ) -> Result<DeviceBuf> {
        let out = w.rows.len();
        let mut y = alloc::<T>(self, rows * out)?;
        if rows * out == 0 {
            return Ok(T::wrap(y, 0));
        }
        let (x, weight) = (held::<T>(self, x)?, held::<T>(self, w.weight)?);
        let bias = match w.bias {
            Some(b) => Some(held::<T>(self, b)?),
            None => None,
        };
        let bias_rows = bias.as_ref().map(|b| b.slice(w.rows.clone()));
        self.gemm(
            &GemmShape::linear(rows, inp, out),
            1.0,
            &x.slice(0..rows * inp),
            &weight.slice(w.rows.start * inp..w.rows.end * inp),
            0.0,
            &mut y.slice_mut(0..rows * out),
            bias_rows.as_ref(),
        )?;
        Ok(T::wrap(y, rows * out))
    }

    /// The linear backward in `T` (the weight's type): `dx` in `T`, the
    /// parameter gradients accumulated in f32 (GEMMs reading `T`, writing f32).
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd_in<T: Stored>(
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
        let dy = held::<T>(self, dy)?;
        let dy_v = dy.slice(0..rows * out);
        let w_rows = r0 * inp..r1 * inp;
        let dx = if want_dx {
            let mut dx = alloc::<T>(self, rows * inp)?;
            if rows * inp * out > 0 {
                let shape = GemmShape {
                    m: rows,
                    k: out,
                    n: inp,
                    trans_a: Trans::No,
                    trans_b: Trans::No,
                };
                let w = held::<T>(self, w)?;
                self.gemm(
                    &shape,
                    1.0,
                    &dy_v,
                    &w.slice(w_rows.clone()),
                    0.0,
                    &mut dx.slice_mut(0..rows * inp),
                    None,
                )?;
            }
            Some(T::wrap(dx, rows * inp))
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
        let x = held::<T>(self, x)?;
        self.gemm::<T, f32, _, _>(
            &dw_shape,
            1.0,
            &dy_v,
            &x.slice(0..rows * inp),
            1.0,
            &mut g.weight.f32_mut()?.slice_mut(w_rows),
            None,
        )?;
        if let Some(b) = g.bias {
            // db += ones[1, rows] @ dy.
            let ones = ones::<T>(self, rows)?;
            let db_shape = GemmShape {
                m: 1,
                k: rows,
                n: out,
                trans_a: Trans::No,
                trans_b: Trans::No,
            };
            self.gemm::<T, f32, _, _>(
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

    fn rmsnorm_fwd_in<T: Stored>(
        &self,
        x: &DeviceBuf,
        w: &DeviceBuf,
        dim: usize,
        eps: f32,
    ) -> Result<(DeviceBuf, DeviceBuf)> {
        let rows = x.len() / dim;
        let (mut y, mut rstd) = (alloc::<T>(self, rows * dim)?, zeros_f32(self, rows)?);
        let (xs, ws) = (held::<T>(self, x)?, held::<T>(self, w)?);
        CudaBackend::rmsnorm_fwd(self, &xs, &ws, rows, dim, eps, &mut y, &mut rstd)?;
        Ok((T::wrap(y, rows * dim), buf(rstd, rows)))
    }

    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd_in<T: Stored>(
        &self,
        dy: &DeviceBuf,
        x: &DeviceBuf,
        w: &DeviceBuf,
        rstd: &DeviceBuf,
        dim: usize,
        dw: &mut DeviceBuf,
    ) -> Result<DeviceBuf> {
        let rows = x.len() / dim;
        let mut dx = alloc::<T>(self, rows * dim)?;
        let (dys, xs, ws) = (
            held::<T>(self, dy)?,
            held::<T>(self, x)?,
            held::<T>(self, w)?,
        );
        CudaBackend::rmsnorm_bwd(
            self,
            &dys,
            &xs,
            &ws,
            rstd.f32()?,
            rows,
            dim,
            &mut dx,
            dw.f32_mut()?,
        )?;
        Ok(T::wrap(dx, rows * dim))
    }

    /// What both attention forwards share: the shape, the inputs held in
    /// `T`, the outputs (`o` in `T`, `lse` f32); `kernel` runs one of them.
    fn attention_fwd_in<T: Stored>(
        &self,
        spec: &AttnSpec,
        cu: &Mirrored<i32>,
        [q, k, v]: [&DeviceBuf; 3],
        kernel: impl FnOnce(
            &FlashAttnShape,
            [&CudaSlice<T>; 3],
            &mut CudaSlice<T>,
            &mut CudaSlice<f32>,
        ) -> Result<()>,
    ) -> Result<(DeviceBuf, DeviceBuf)> {
        let shape = FlashAttnShape::of(&spec.over(&cu.host))?;
        let rows = q.len() / spec.head_dim;
        let (mut o, mut lse) = (alloc::<T>(self, q.len())?, zeros_f32(self, rows)?);
        let (hq, hk, hv) = (
            held::<T>(self, q)?,
            held::<T>(self, k)?,
            held::<T>(self, v)?,
        );
        kernel(&shape, [&*hq, &*hk, &*hv], &mut o, &mut lse)?;
        Ok((T::wrap(o, q.len()), buf(lse, rows)))
    }

    /// What both attention backwards share: the shape, the inputs held in
    /// `T`, the `delta` scratch and the gradients in `T`; `kernel` runs one
    /// of them.
    fn attention_bwd_in<T: Stored>(
        &self,
        spec: &AttnSpec,
        cu: &Mirrored<i32>,
        [q, k, v, o, d_o]: [&DeviceBuf; 5],
        kernel: impl FnOnce(
            &FlashAttnShape,
            [&CudaSlice<T>; 5],
            &mut CudaSlice<f32>,
            [&mut CudaSlice<T>; 3],
        ) -> Result<()>,
    ) -> Result<(DeviceBuf, DeviceBuf, DeviceBuf)> {
        let shape = FlashAttnShape::of(&spec.over(&cu.host))?;
        let mut delta = zeros_f32(self, q.len() / spec.head_dim)?;
        let (mut dq, mut dk, mut dv) = (
            alloc::<T>(self, q.len())?,
            alloc::<T>(self, k.len())?,
            alloc::<T>(self, v.len())?,
        );
        let (hq, hk, hv) = (
            held::<T>(self, q)?,
            held::<T>(self, k)?,
            held::<T>(self, v)?,
        );
        let (ho, hd) = (held::<T>(self, o)?, held::<T>(self, d_o)?);
        kernel(
            &shape,
            [&*hq, &*hk, &*hv, &*ho, &*hd],
            &mut delta,
            [&mut dq, &mut dk, &mut dv],
        )?;
        Ok((
            T::wrap(dq, q.len()),
            T::wrap(dk, k.len()),
            T::wrap(dv, v.len()),
        ))
    }
}

/// The first `n` elements of a buffer, as cudarc views.
fn view<T>(s: &CudaSlice<T>, n: usize) -> CudaView<'_, T> {
    s.slice(0..n)
}

impl Backend for CudaBackend {
    type Buf = DeviceBuf;
    type Index = Mirrored<i32>;
    type Ids = Mirrored<u32>;
    type Rope = DeviceRope;
    type Seqlens = Mirrored<i32>;
    type Graph = cudarc::driver::CudaGraph;

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
        Ok(match src.storage() {
            Storage::F32(s) => self.stream().clone_dtoh(&view(s, src.len()))?,
            Storage::Bf16(s) => self
                .stream()
                .clone_dtoh(&view(s, src.len()))?
                .into_iter()
                .map(bf16::to_f32)
                .collect(),
        })
    }

    fn zeros(&self, len: usize) -> Result<DeviceBuf> {
        self.new_buf(len)
    }

    fn cast(&self, src: &DeviceBuf, dtype: DType) -> Result<DeviceBuf> {
        let n = src.len();
        Ok(match (src.storage(), dtype) {
            (Storage::F32(s), DType::F32) => buf(self.stream().clone_dtod(s)?, n),
            (Storage::Bf16(s), DType::Bf16) => {
                DeviceBuf::from_bf16(self.stream().clone_dtod(s)?, n)
            }
            (Storage::F32(_), DType::Bf16) => DeviceBuf::from_bf16(bf16::convert(self, src)?, n),
            (Storage::Bf16(_), DType::F32) => buf(f32::convert(self, src)?, n),
        })
    }

    fn copy(&self, src: &DeviceBuf) -> Result<DeviceBuf> {
        self.cast(src, src.dtype())
    }

    /// In the first part's dtype.
    fn concat(&self, parts: &[&DeviceBuf]) -> Result<DeviceBuf> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let dtype = parts.first().map_or(DType::F32, |p| p.dtype());
        in_dtype!(dtype, T => {
            let mut out = alloc::<T>(self, total)?;
            let mut at = 0;
            for p in parts {
                let n = p.len();
                if n > 0 {
                    let part = held::<T>(self, p)?;
                    self.stream()
                        .memcpy_dtod(&view(&part, n), &mut out.slice_mut(at..at + n))?;
                }
                at += n;
            }
            Ok(T::wrap(out, total))
        })
    }

    fn fill_zero(&self, buf: &mut DeviceBuf) -> Result<()> {
        match &mut buf.storage {
            Storage::F32(s) => self.stream().memset_zeros(s)?,
            Storage::Bf16(s) => self.stream().memset_zeros(s)?,
        }
        Ok(())
    }

    fn write(&self, dst: &mut DeviceBuf, host: &[f32]) -> Result<()> {
        assert_eq!(dst.len(), host.len(), "write: lengths differ");
        if host.is_empty() {
            return Ok(());
        }
        match &mut dst.storage {
            Storage::F32(s) => self
                .stream()
                .memcpy_htod(host, &mut s.slice_mut(0..host.len()))?,
            Storage::Bf16(s) => {
                // Rounded on the device, as every bf16 write.
                let staged = self.stream().clone_htod(host)?;
                self.cast_f32_to_bf16(&staged, host.len(), s)?;
            }
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

    fn captures(&self) -> bool {
        true
    }

    /// A CUDA graph of the stream's work. Where the context tracks buffers
    /// across several streams (NCCL's), every buffer use would wait on an
    /// event recorded outside the capture, which a capture refuses; so the
    /// tracking pauses while the body is recorded, with nothing in flight
    /// on any stream. Buffers made before the capture are the only ones the
    /// graph keeps, and the generator synchronizes before handing them to
    /// another stream (each step downloads its samples).
    fn capture(
        &self,
        body: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<cudarc::driver::CudaGraph>> {
        // cuBLAS' handle and workspace are made on first use; made inside
        // the capture, the workspace would belong to the graph.
        self.blas()?;
        let ctx = self.context();
        let tracking = ctx.is_managing_stream_synchronization();
        if tracking {
            ctx.synchronize()?;
            // SAFETY: every stream of the context is idle (just
            // synchronized) and only this thread's capture uses the context
            // until tracking resumes below; slices made meanwhile are the
            // body's temporaries, freed inside the graph.
            unsafe { ctx.disable_event_tracking() };
        }
        let recorded = self.record(body);
        if tracking {
            // SAFETY: resumes the tracking paused above.
            unsafe { ctx.enable_event_tracking() };
        }
        if recorded.is_err() {
            // The failed capture's temporaries were dropped inside it and
            // their frees refused; cudarc keeps such errors for the next
            // call, which would fail the eager fallback instead.
            let _ = ctx.check_err();
        }
        let graph = recorded?;
        // Loads the graph's resources now, not at its first replay.
        graph.upload()?;
        Ok(Some(graph))
    }
    fn replay(&self, graph: &cudarc::driver::CudaGraph) -> Result<()> {
        graph.launch()?;
        Ok(())
    }

    fn release_graph_memory(&self) -> Result<()> {
        // The graphs' last replays must be done before their pool shrinks.
        self.stream().synchronize()?;
        // SAFETY: trims the device's graph memory pool; the device handle
        // comes from the live context, and no graph of it is running.
        unsafe { cudarc::driver::sys::cuDeviceGraphMemTrim(self.context().cu_device()) }
            .result()?;
        Ok(())
    }

    fn write_index(&self, dst: &mut Mirrored<i32>, host: &[i32]) -> Result<()> {
        self.write_mirrored(dst, host)
    }

    fn write_ids(&self, dst: &mut Mirrored<u32>, host: &[u32]) -> Result<()> {
        self.write_mirrored(dst, host)
    }

    fn write_rope(
        &self,
        rope: &mut DeviceRope,
        _freqs: &RopeFreqs,
        streams: &[&[i32]],
    ) -> Result<()> {
        let flat: Vec<i32> = streams.concat();
        assert_eq!(
            flat.len(),
            rope.tokens * streams.len(),
            "write_rope: token counts differ"
        );
        if !flat.is_empty() {
            self.stream()
                .memcpy_htod(&flat, &mut rope.positions.slice_mut(0..flat.len()))?;
        }
        Ok(())
    }

    fn copy_into(&self, dst: &mut DeviceBuf, src: &DeviceBuf) -> Result<()> {
        assert_eq!(dst.len, src.len, "copy_into: lengths differ");
        let n = src.len;
        if n == 0 {
            return Ok(());
        }
        let s = self.stream();
        match (&mut dst.storage, &src.storage) {
            (Storage::F32(d), Storage::F32(x)) => {
                s.memcpy_dtod(&x.slice(0..n), &mut d.slice_mut(0..n))?
            }
            (Storage::Bf16(d), Storage::Bf16(x)) => {
                s.memcpy_dtod(&x.slice(0..n), &mut d.slice_mut(0..n))?
            }
            _ => panic!("copy_into: storage differs"),
        }
        Ok(())
    }

    fn free_memory(&self) -> Option<usize> {
        self.context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free)
    }

    /// In the weight's dtype.
    fn linear_fwd(
        &self,
        x: &DeviceBuf,
        rows: usize,
        inp: usize,
        w: &WeightRows<'_, DeviceBuf>,
    ) -> Result<DeviceBuf> {
        in_dtype!(w.weight.dtype(), T => self.linear_fwd_in::<T>(x, rows, inp, w))
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
        in_dtype!(w.dtype(), T => self.linear_bwd_in::<T>(dy, x, rows, inp, w, g, want_dx))
    }

    /// In `x`'s dtype.
    fn rmsnorm_fwd(
        &self,
        x: &DeviceBuf,
        w: &DeviceBuf,
        dim: usize,
        eps: f32,
    ) -> Result<(DeviceBuf, DeviceBuf)> {
        in_dtype!(x.dtype(), T => self.rmsnorm_fwd_in::<T>(x, w, dim, eps))
    }

    /// In `dy`'s dtype.
    fn rmsnorm_bwd(
        &self,
        dy: &DeviceBuf,
        x: &DeviceBuf,
        w: &DeviceBuf,
        rstd: &DeviceBuf,
        dim: usize,
        dw: &mut DeviceBuf,
    ) -> Result<DeviceBuf> {
        in_dtype!(dy.dtype(), T => self.rmsnorm_bwd_in::<T>(dy, x, w, rstd, dim, dw))
    }

    fn swiglu_fwd(&self, gate: &DeviceBuf, up: &DeviceBuf) -> Result<DeviceBuf> {
        let n = gate.len();
        in_dtype!(gate.dtype(), T => {
            let mut h = alloc::<T>(self, n)?;
            let (g, u) = (held::<T>(self, gate)?, held::<T>(self, up)?);
            CudaBackend::swiglu_fwd(self, &g, &u, n, &mut h)?;
            Ok(T::wrap(h, n))
        })
    }

    fn swiglu_bwd(
        &self,
        d_act: &DeviceBuf,
        gate: &DeviceBuf,
        up: &DeviceBuf,
    ) -> Result<(DeviceBuf, DeviceBuf)> {
        let n = gate.len();
        in_dtype!(d_act.dtype(), T => {
            let (mut dg, mut du) = (alloc::<T>(self, n)?, alloc::<T>(self, n)?);
            let (d, g, u) = (
                held::<T>(self, d_act)?,
                held::<T>(self, gate)?,
                held::<T>(self, up)?,
            );
            CudaBackend::swiglu_bwd(self, &d, &g, &u, n, &mut dg, &mut du)?;
            Ok((T::wrap(dg, n), T::wrap(du, n)))
        })
    }

    fn gelu_fwd(&self, x: &DeviceBuf) -> Result<DeviceBuf> {
        let n = x.len();
        in_dtype!(x.dtype(), T => {
            let mut y = alloc::<T>(self, n)?;
            CudaBackend::gelu_fwd(self, &*held::<T>(self, x)?, n, &mut y)?;
            Ok(T::wrap(y, n))
        })
    }

    fn gelu_bwd(&self, dy: &DeviceBuf, x: &DeviceBuf) -> Result<DeviceBuf> {
        let n = x.len();
        in_dtype!(dy.dtype(), T => {
            let mut dx = alloc::<T>(self, n)?;
            let (d, xs) = (held::<T>(self, dy)?, held::<T>(self, x)?);
            CudaBackend::gelu_bwd(self, &d, &xs, n, &mut dx)?;
            Ok(T::wrap(dx, n))
        })
    }

    /// In `acc`'s dtype (`x` converted to it first).
    fn add_into(&self, acc: &mut DeviceBuf, x: &DeviceBuf) -> Result<()> {
        let n = x.len();
        assert_eq!(acc.len(), n, "add_into: lengths differ");
        if n == 0 {
            return Ok(());
        }
        in_dtype!(acc.dtype(), T => {
            let xs = held::<T>(self, x)?;
            let dst = T::own_mut(acc).expect("acc is a T buffer");
            self.add_inplace(&mut dst.slice_mut(0..n), &view(&xs, n), n)?;
            Ok(())
        })
    }

    fn rope_apply(
        &self,
        rope: &DeviceRope,
        x: &DeviceBuf,
        heads: usize,
        backward: bool,
    ) -> Result<DeviceBuf> {
        in_dtype!(x.dtype(), T => {
            let mut y = alloc::<T>(self, x.len())?;
            CudaBackend::rope(
                self,
                &rope.freqs,
                &rope.positions,
                rope.tokens,
                heads,
                backward,
                &*held::<T>(self, x)?,
                &mut y,
            )?;
            Ok(T::wrap(y, x.len()))
        })
    }

    /// In `q`'s dtype; `lse` f32.
    fn attention_fwd(
        &self,
        spec: &AttnSpec,
        cu: &Mirrored<i32>,
        q: &DeviceBuf,
        k: &DeviceBuf,
        v: &DeviceBuf,
    ) -> Result<(DeviceBuf, DeviceBuf)> {
        if q.dtype() == DType::Bf16 && flash_tc_supports(spec.head_dim) {
            // bf16 precision: tensor cores (the CUDA-core kernel below stays
            // the exact path of fp32 precision).
            return self.attention_fwd_in::<bf16>(
                spec,
                cu,
                [q, k, v],
                |shape, [q, k, v], o, lse| {
                    // Hopper, long sequences: the wgmma (FlashAttention-3
                    // structure) kernel, same buffers and contract;
                    // VPPO_ATTN_WGMMA=0 keeps FA2.
                    let fwd = if self.wgmma_fwd_chosen(shape) {
                        CudaBackend::flash_attn_wgmma_fwd
                    } else {
                        CudaBackend::flash_attn_tc_fwd
                    };
                    Ok(fwd(self, shape, q, k, v, &cu.dev, &cu.dev, o, lse)?)
                },
            );
        }
        in_dtype!(q.dtype(), T => self.attention_fwd_in::<T>(spec, cu, [q, k, v], |shape, [q, k, v], o, lse| {
            Ok(self.flash_attn_fwd(shape, q, k, v, &cu.dev, &cu.dev, o, lse)?)
        }))
    }

    /// In `d_o`'s dtype.
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
        let lse = lse.f32()?;
        let inputs = [q, k, v, o, d_o];
        if d_o.dtype() == DType::Bf16 && flash_tc_supports(spec.head_dim) {
            // dQ is accumulated atomically in f32 here, so it may differ in
            // the last bits between runs.
            return self.attention_bwd_in::<bf16>(
                spec,
                cu,
                inputs,
                |shape, [q, k, v, o, d_o], delta, [dq, dk, dv]| {
                    let mut dq_acc = zeros_f32(self, q.len())?;
                    // Hopper, long sequences: the wgmma (FlashAttention-3
                    // structure) backward, same buffers and contract.
                    let bwd = if self.wgmma_bwd_chosen(shape) {
                        CudaBackend::flash_attn_wgmma_bwd
                    } else {
                        CudaBackend::flash_attn_tc_bwd
                    };
                    Ok(bwd(
                        self,
                        shape,
                        q,
                        k,
                        v,
                        o,
                        lse,
                        d_o,
                        &cu.dev,
                        &cu.dev,
                        delta,
                        &mut dq_acc,
                        dq,
                        dk,
                        dv,
                    )?)
                },
            );
        }
        in_dtype!(d_o.dtype(), T => self.attention_bwd_in::<T>(spec, cu, inputs, |shape, [q, k, v, o, d_o], delta, [dq, dk, dv]| {
            Ok(self.flash_attn_bwd(shape, q, k, v, o, lse, d_o, &cu.dev, &cu.dev, delta, dq, dk, dv)?)
        }))
    }

    /// In the caches' dtype (`q` converted to it); `o` in `q`'s.
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
        if k_cache.dtype() == DType::Bf16 && paged_tc_supports(shape) {
            // bf16 caches: flash-decoding on tensor cores.
            let batch = lens.host.len();
            let max_len = lens
                .host
                .iter()
                .map(|&l| l.max(0) as usize)
                .max()
                .unwrap_or(0);
            let plan = paged_tc_plan(batch, shape.kv_heads, max_len);
            let mut scratch = zeros_f32(self, paged_tc_scratch_len(shape, batch, &plan))?;
            let mut o = alloc::<bf16>(self, q.len())?;
            self.paged_decode_attention_tc(
                shape,
                batch,
                max_len,
                &*held::<bf16>(self, q)?,
                &*held::<bf16>(self, k_cache)?,
                &*held::<bf16>(self, v_cache)?,
                &tables.dev,
                stride,
                &lens.dev,
                &mut scratch,
                &mut o,
            )?;
            return store(self, o, q.len(), q.dtype());
        }
        in_dtype!(k_cache.dtype(), T => {
            let mut o = alloc::<T>(self, q.len())?;
            self.paged_decode_attention(
                shape,
                lens.host.len(),
                &*held::<T>(self, q)?,
                &*held::<T>(self, k_cache)?,
                &*held::<T>(self, v_cache)?,
                &tables.dev,
                stride,
                &lens.dev,
                &mut o,
            )?;
            store(self, o, q.len(), q.dtype())
        })
    }

    /// In the table's dtype.
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
        in_dtype!(table.dtype(), T => {
            let mut x = alloc::<T>(self, tokens * dim)?;
            let t = held::<T>(self, table)?;
            CudaBackend::embedding_fwd(self, &ids.dev, tokens, &t, vocab, dim, &mut x)?;
            Ok(T::wrap(x, tokens * dim))
        })
    }

    /// `d_out` widened to f32; the table's gradient is f32.
    fn embedding_bwd(
        &self,
        ids: &Mirrored<u32>,
        d_out: &DeviceBuf,
        dim: usize,
        d_table: &mut DeviceBuf,
    ) -> Result<()> {
        let d = self.as_f32(d_out)?;
        CudaBackend::embedding_bwd(self, &ids.host, &d, dim, d_table.f32_mut()?)?;
        Ok(())
    }

    fn gather_rows(&self, src: &DeviceBuf, idx: &Mirrored<i32>, width: usize) -> Result<DeviceBuf> {
        let rows = idx.host.len();
        in_dtype!(src.dtype(), T => {
            let mut out = alloc::<T>(self, rows * width)?;
            if rows * width > 0 {
                CudaBackend::gather_rows(
                    self,
                    &T::own(src).expect("src is a T buffer").slice(..),
                    &idx.dev.slice(..),
                    rows,
                    width,
                    &mut out.slice_mut(..),
                )?;
            }
            Ok(T::wrap(out, rows * width))
        })
    }

    /// In `dst`'s dtype (`src` converted to it).
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
        in_dtype!(dst.dtype(), T => {
            let s = held::<T>(self, src)?;
            CudaBackend::scatter_rows(
                self,
                &s.slice(..),
                &idx.dev.slice(..),
                rows,
                width,
                &mut T::own_mut(dst).expect("dst is a T buffer").slice_mut(..),
            )?;
            Ok(())
        })
    }

    /// Statistics in f32 (bf16 logits widened).
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
            in_dtype!(logits.dtype(), T => {
                let l = T::own(logits).expect("logits are a T buffer");
                self.logprob_chunk(&chunk, l, &targets.dev, true, &mut state)?
            });
            self.logprob_finish(&state, rows, &mut logp, &mut ent, &mut lse)?;
        }
        Ok((buf(logp, rows), buf(ent, rows), buf(lse, rows)))
    }

    /// `d_logits` in the logits' dtype (computed in f32).
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
        in_dtype!(logits.dtype(), T => {
            let mut d_logits = alloc::<T>(self, rows * vocab)?;
            if rows > 0 {
                self.logprob_bwd_chunk(
                    &whole_vocab(rows, vocab),
                    T::own(logits).expect("logits are a T buffer"),
                    &targets.dev,
                    lse.f32()?,
                    entropy.f32()?,
                    &*self.as_f32(d_logp)?,
                    &*self.as_f32(d_entropy)?,
                    &mut d_logits,
                )?;
            }
            Ok(T::wrap(d_logits, rows * vocab))
        })
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
            &*self.as_f32(a)?,
            &*self.as_f32(b)?,
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
        let mut masked = match self.as_f32(logits)? {
            Held::Own(l) => s.clone_dtod(l)?,
            Held::Converted(l) => l,
            Held::Shared(l) => s.clone_dtod(&*l)?,
        };
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
        copies: Option<&mut [DeviceBuf]>,
    ) -> Result<()> {
        let mut copies = copies.map(|c| c.iter_mut());
        let mut tensors = Vec::with_capacity(params.len());
        for (((param, grad), m), v) in params.iter_mut().zip(grads).zip(exp_avg).zip(exp_avg_sq) {
            let model = match copies.as_mut().and_then(|c| c.next()) {
                // The kernel writes the master's bf16 copy in the same pass.
                Some(copy) => Some(
                    copy.bf16_mut()
                        .map_err(|_| dtype_mismatch(DType::Bf16, DType::F32))?,
                ),
                None => None,
            };
            tensors.push(AdamWTensor {
                param: param.f32_mut()?,
                grad: grad.f32()?,
                exp_avg: m.f32_mut()?,
                exp_avg_sq: v.f32_mut()?,
                model,
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
