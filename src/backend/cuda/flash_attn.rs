//! Launchers of the flash-attention kernels (`kernels/flash_attn.cu`).
//! Each keeps the C signature it launches in a comment: kernel arguments are
//! untyped.

use super::launch_util::{need, opt_in_smem, to_i32, Elem};
use super::{CudaBackend, CudaError};
use crate::backend::cpu::check_cu_seqlens;
use crate::backend::desc::VarlenAttention;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Rows of a flash-attention tile and threads of its block (see the .cu file).
const FA_TILE: usize = 32;
const FA_THREADS: u32 = 128;

/// Host-side facts about one packed varlen attention call; the device
/// `cu_seqlens` passed with it must hold the same offsets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashAttnShape {
    pub seqs: usize,
    pub total_q: usize,
    pub total_k: usize,
    pub max_seqlen_q: usize,
    pub max_seqlen_k: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

impl FlashAttnShape {
    /// The shape of the CPU op's call `cfg` (its host `cu_seqlens`).
    pub fn of(cfg: &VarlenAttention) -> Result<Self, CudaError> {
        let bad = |reason: String| CudaError::Unsupported {
            kernel: "flash_attn",
            reason,
        };
        if cfg.cu_seqlens_q.len() != cfg.cu_seqlens_k.len() || cfg.cu_seqlens_q.is_empty() {
            return Err(bad("cu_seqlens_q and cu_seqlens_k differ in length".into()));
        }
        let total = |cu: &[i32]| cu.last().map_or(0, |&t| t.max(0) as usize);
        let (total_q, total_k) = (total(cfg.cu_seqlens_q), total(cfg.cu_seqlens_k));
        let q = check_cu_seqlens(cfg.cu_seqlens_q, total_q).map_err(|e| bad(e.to_string()))?;
        let k = check_cu_seqlens(cfg.cu_seqlens_k, total_k).map_err(|e| bad(e.to_string()))?;
        let max_len = |c: &[usize]| c.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        Ok(Self {
            seqs: q.len() - 1,
            total_q,
            total_k,
            max_seqlen_q: max_len(&q),
            max_seqlen_k: max_len(&k),
            q_heads: cfg.q_heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            causal: cfg.causal,
            scale: cfg.scale as f32,
        })
    }

    pub(super) fn check(&self, kernel: &'static str) -> Result<(), CudaError> {
        let bad = |reason: String| Err(CudaError::Unsupported { kernel, reason });
        if !matches!(self.head_dim, 16 | 64 | 80 | 128) {
            return bad(format!(
                "head_dim {} (instantiated: 16, 64, 80, 128)",
                self.head_dim
            ));
        }
        if self.kv_heads == 0 || self.q_heads % self.kv_heads != 0 {
            return bad(format!(
                "q_heads {} is not a multiple of kv_heads {}",
                self.q_heads, self.kv_heads
            ));
        }
        if self.seqs > 65_535 || self.q_heads > 65_535 {
            return bad(format!(
                "{} sequences x {} heads exceed the grid",
                self.seqs, self.q_heads
            ));
        }
        Ok(())
    }

    /// [`Self::check`], then that each buffer holds what the call needs:
    /// `q_like` `[Tq, q_heads, D]`, `k_like` `[Tk, kv_heads, D]`, `rows`
    /// `[Tq, q_heads]`, and both `cu_seqlens` (their lengths).
    pub(super) fn check_buffers(
        &self,
        kernel: &'static str,
        q_like: &[(&str, usize)],
        k_like: &[(&str, usize)],
        rows: &[(&str, usize)],
        cu_seqlens: [usize; 2],
    ) -> Result<(), CudaError> {
        self.check(kernel)?;
        let wants = [
            (q_like, self.q_elems()),
            (k_like, self.k_elems()),
            (rows, self.total_q * self.q_heads),
        ];
        for (buffers, want) in wants {
            for &(what, len) in buffers {
                need(kernel, what, len, want)?;
            }
        }
        let [q, k] = cu_seqlens;
        need(kernel, "cu_seqlens_q", q, self.seqs + 1)?;
        need(kernel, "cu_seqlens_k", k, self.seqs + 1)
    }

    /// [`Self::check_buffers`] for a forward's buffers (`q`, `k`, `v`, both
    /// `cu_seqlens`, `o`, `lse`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check_fwd_buffers<T>(
        &self,
        kernel: &'static str,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        cu_seqlens_q: &CudaSlice<i32>,
        cu_seqlens_k: &CudaSlice<i32>,
        o: &CudaSlice<T>,
        lse: &CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        self.check_buffers(
            kernel,
            &[("q", q.len()), ("o", o.len())],
            &[("k", k.len()), ("v", v.len())],
            &[("lse", lse.len())],
            [cu_seqlens_q.len(), cu_seqlens_k.len()],
        )
    }

    /// The kernels' `int hq, int hkv, ..., int causal` arguments.
    pub(super) fn kernel_ints(&self, kernel: &'static str) -> Result<(i32, i32, i32), CudaError> {
        let hq = to_i32(kernel, "q_heads", self.q_heads)?;
        let hkv = to_i32(kernel, "kv_heads", self.kv_heads)?;
        Ok((hq, hkv, i32::from(self.causal)))
    }

    pub(super) fn q_elems(&self) -> usize {
        self.total_q * self.q_heads * self.head_dim
    }

    pub(super) fn k_elems(&self) -> usize {
        self.total_k * self.kv_heads * self.head_dim
    }
}

/// Shared memory of the three flash kernels, in floats (mirrors the .cu).
fn fa_smem_bytes(kind: &str, d: usize) -> usize {
    let tile = FA_TILE * (d + 1);
    let p = FA_TILE * (FA_TILE + 1);
    let floats = match kind {
        "fwd" => 2 * tile + p,
        "bwd_dq" => 4 * tile + p,
        _ => 4 * tile + 2 * p + 2 * FA_TILE,
    };
    floats * std::mem::size_of::<f32>()
}

fn fa_config(tiles: usize, heads: usize, seqs: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tiles.max(1) as u32, heads as u32, seqs as u32),
        block_dim: (FA_THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

impl CudaBackend {
    /// The backward's first pass: `delta[r] = dot(o[r], dout[r])` over the
    /// `rows` rows of `d` elements (both attention backwards start with it).
    // flash_attn_bwd_delta_{f32,bf16}(const T* o, const T* dout, float* delta,
    //     int rows, int head_dim)
    pub(super) fn flash_attn_bwd_delta<T: Elem>(
        &self,
        kernel: &'static str,
        o: &CudaSlice<T>,
        dout: &CudaSlice<T>,
        delta: &mut CudaSlice<f32>,
        rows: usize,
        d: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        need(kernel, "o", o.len(), rows * d)?;
        need(kernel, "dout", dout.len(), rows * d)?;
        need(kernel, "delta", delta.len(), rows)?;
        let f = self.function("flash_attn", &format!("flash_attn_bwd_delta_{}", T::SUFFIX))?;
        let rows_i = to_i32(kernel, "rows", rows)?;
        let d_i = to_i32(kernel, "head_dim", d)?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(o).arg(dout).arg(delta).arg(&rows_i).arg(&d_i);
        let warps_per_block = 8;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(warps_per_block) as u32, 1, 1),
            block_dim: (32 * warps_per_block as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches the C signature above; o and dout hold rows*d
        // elements and delta rows floats (checked above).
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

impl CudaBackend {
    /// Twin of `cpu::flash_attn::attention_fwd`: writes `o[Tq, q_heads, D]`
    /// and `lse[Tq, q_heads]` (f32 whatever the storage type `T`).
    // flash_attn_fwd_d{80,128}_{f32,bf16}(const T* q, const T* k, const T* v,
    //     const int* cu_q, const int* cu_k, T* o, float* lse,
    //     int hq, int hkv, float scale, int causal)
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attn_fwd<T: Elem>(
        &self,
        shape: &FlashAttnShape,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        cu_seqlens_q: &CudaSlice<i32>,
        cu_seqlens_k: &CudaSlice<i32>,
        o: &mut CudaSlice<T>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const K: &str = "flash_attn_fwd";
        shape.check_fwd_buffers(K, q, k, v, cu_seqlens_q, cu_seqlens_k, o, lse)?;
        if shape.seqs == 0 || shape.max_seqlen_q == 0 {
            return Ok(());
        }
        let d = shape.head_dim;
        let f = self.function("flash_attn", &format!("flash_attn_fwd_d{d}_{}", T::SUFFIX))?;
        let smem = fa_smem_bytes("fwd", d);
        opt_in_smem(&f, smem)?;
        let (hq, hkv, causal) = shape.kernel_ints(K)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(cu_seqlens_q)
            .arg(cu_seqlens_k)
            .arg(o)
            .arg(lse)
            .arg(&hq)
            .arg(&hkv)
            .arg(&shape.scale)
            .arg(&causal);
        let cfg = fa_config(
            shape.max_seqlen_q.div_ceil(FA_TILE),
            shape.q_heads,
            shape.seqs,
            smem,
        );
        // SAFETY: matches the C signature above; buffer sizes were checked
        // against the shape, whose offsets the device cu_seqlens repeat; the
        // dynamic shared memory is what the kernel carves up.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// Twin of `cpu::flash_attn::attention_bwd`: writes `dq`, `dk`, `dv`
    /// (overwritten). `delta` is scratch of `Tq * q_heads` floats.
    // flash_attn_bwd_delta_{f32,bf16}(const T* o, const T* dout, float* delta,
    //     int rows, int head_dim)
    // flash_attn_bwd_dq_d{80,128}_{f32,bf16}(const T* q, const T* k, const T* v,
    //     const T* dout, const float* lse, const float* delta,
    //     const int* cu_q, const int* cu_k, T* dq, int hq, int hkv,
    //     float scale, int causal)
    // flash_attn_bwd_dkdv_d{80,128}_{f32,bf16}(const T* q, const T* k,
    //     const T* v, const T* dout, const float* lse, const float* delta,
    //     const int* cu_q, const int* cu_k, T* dk, T* dv, int hq, int hkv,
    //     float scale, int causal)
    #[allow(clippy::too_many_arguments)]
    pub fn flash_attn_bwd<T: Elem>(
        &self,
        shape: &FlashAttnShape,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        o: &CudaSlice<T>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<T>,
        cu_seqlens_q: &CudaSlice<i32>,
        cu_seqlens_k: &CudaSlice<i32>,
        delta: &mut CudaSlice<f32>,
        dq: &mut CudaSlice<T>,
        dk: &mut CudaSlice<T>,
        dv: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        const K: &str = "flash_attn_bwd";
        shape.check_buffers(
            K,
            &[
                ("q", q.len()),
                ("o", o.len()),
                ("dout", dout.len()),
                ("dq", dq.len()),
            ],
            &[
                ("k", k.len()),
                ("v", v.len()),
                ("dk", dk.len()),
                ("dv", dv.len()),
            ],
            &[("lse", lse.len()), ("delta", delta.len())],
            [cu_seqlens_q.len(), cu_seqlens_k.len()],
        )?;
        let rows = shape.total_q * shape.q_heads;
        if shape.seqs == 0 {
            return Ok(());
        }
        let d = shape.head_dim;
        let (hq, hkv, causal) = shape.kernel_ints(K)?;

        self.flash_attn_bwd_delta(K, o, dout, delta, rows, d)?;
        if shape.max_seqlen_q > 0 {
            let f = self.function(
                "flash_attn",
                &format!("flash_attn_bwd_dq_d{d}_{}", T::SUFFIX),
            )?;
            let smem = fa_smem_bytes("bwd_dq", d);
            opt_in_smem(&f, smem)?;
            let mut launch = self.stream.launch_builder(&f);
            launch
                .arg(q)
                .arg(k)
                .arg(v)
                .arg(dout)
                .arg(lse)
                .arg(&*delta)
                .arg(cu_seqlens_q)
                .arg(cu_seqlens_k)
                .arg(dq)
                .arg(&hq)
                .arg(&hkv)
                .arg(&shape.scale)
                .arg(&causal);
            let cfg = fa_config(
                shape.max_seqlen_q.div_ceil(FA_TILE),
                shape.q_heads,
                shape.seqs,
                smem,
            );
            // SAFETY: matches the C signature above; sizes checked against the shape.
            unsafe { launch.launch(cfg) }?;
        }
        if shape.max_seqlen_k > 0 {
            let f = self.function(
                "flash_attn",
                &format!("flash_attn_bwd_dkdv_d{d}_{}", T::SUFFIX),
            )?;
            let smem = fa_smem_bytes("bwd_dkdv", d);
            opt_in_smem(&f, smem)?;
            let mut launch = self.stream.launch_builder(&f);
            launch
                .arg(q)
                .arg(k)
                .arg(v)
                .arg(dout)
                .arg(lse)
                .arg(&*delta)
                .arg(cu_seqlens_q)
                .arg(cu_seqlens_k)
                .arg(dk)
                .arg(dv)
                .arg(&hq)
                .arg(&hkv)
                .arg(&shape.scale)
                .arg(&causal);
            let cfg = fa_config(
                shape.max_seqlen_k.div_ceil(FA_TILE),
                shape.kv_heads,
                shape.seqs,
                smem,
            );
            // SAFETY: matches the C signature above; sizes checked against the shape.
            unsafe { launch.launch(cfg) }?;
        }
        Ok(())
    }
}
