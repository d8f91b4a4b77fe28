//! Flash attention (forward + backward, f32 and bf16 storage) against
//! `cpu::flash_attn`.

use crate::{check, check_truth, cuda, drv, random, to_bf16, to_f64, widen, CaseResult};
use crate::{Case, BF16_TOL, FP32_TOL};
use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;
use rand::rngs::StdRng;
use vppo_engine::backend::cpu;
use vppo_engine::backend::cpu::flash_attn::VarlenAttention;
use vppo_engine::backend::cpu::Real;
use vppo_engine::backend::cuda::{CudaBackend, Elem, FlashAttnShape};

/// The first `n` values of a device buffer, widened to f32.
pub(crate) fn down_bf16(
    gpu: &CudaBackend,
    x: &CudaSlice<bf16>,
    n: usize,
) -> Result<Vec<f32>, String> {
    Ok(widen(&gpu.stream().clone_dtoh(x).map_err(drv)?[..n]))
}

/// The first `n` values of a device buffer.
pub(crate) fn down_f32(
    gpu: &CudaBackend,
    x: &CudaSlice<f32>,
    n: usize,
) -> Result<Vec<f32>, String> {
    let mut v = gpu.stream().clone_dtoh(x).map_err(drv)?;
    v.truncate(n);
    Ok(v)
}

/// Like `check`, for log-sum-exps: infinities must agree exactly (a query
/// that sees no key has lse = -inf), the finite values within `tol`.
fn check_lse(gpu: &[f32], cpu: &[f32], tol: f64) -> Result<f64, String> {
    if gpu.len() != cpu.len() {
        return Err("lse: length differs".into());
    }
    if let Some(i) = (0..cpu.len()).find(|&i| cpu[i].is_finite() != gpu[i].is_finite()) {
        return Err(format!("lse[{i}]: gpu {} cpu {}", gpu[i], cpu[i]));
    }
    if let Some(i) = (0..cpu.len()).find(|&i| !cpu[i].is_finite() && gpu[i] != cpu[i]) {
        return Err(format!("lse[{i}]: gpu {} cpu {}", gpu[i], cpu[i]));
    }
    let keep = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .zip(cpu)
            .filter(|(_, c)| c.is_finite())
            .map(|(g, _)| *g)
            .collect()
    };
    check("lse", &keep(gpu), &keep(cpu), tol)
}

/// `cu_seqlens` of sequences of `lens`.
pub(crate) fn offsets(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as i32);
    }
    cu
}

/// One packed varlen attention problem of a case (`q_lens[s]` queries
/// against `k_lens[s]` keys per sequence) with what every attention case
/// derives from it: the offsets, the CPU op's config (scale 1/sqrt(D)) and
/// the element counts of q-like `[Tq, q_heads, D]` (`nq`) and k-like
/// `[Tk, kv_heads, D]` (`nk`) tensors and of lse rows `[Tq, q_heads]`.
pub(crate) struct Problem {
    pub q_lens: Vec<usize>,
    pub k_lens: Vec<usize>,
    pub cu_q: Vec<i32>,
    pub cu_k: Vec<i32>,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub nq: usize,
    pub nk: usize,
    pub rows: usize,
}

impl Problem {
    pub fn new(
        q_lens: Vec<usize>,
        k_lens: Vec<usize>,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        causal: bool,
    ) -> Self {
        let (tq, tk): (usize, usize) = (q_lens.iter().sum(), k_lens.iter().sum());
        Self {
            cu_q: offsets(&q_lens),
            cu_k: offsets(&k_lens),
            q_lens,
            k_lens,
            q_heads,
            kv_heads,
            head_dim,
            causal,
            nq: tq * q_heads * head_dim,
            nk: tk * kv_heads * head_dim,
            rows: tq * q_heads,
        }
    }

    pub fn cfg(&self) -> VarlenAttention<'_> {
        VarlenAttention {
            cu_seqlens_q: &self.cu_q,
            cu_seqlens_k: &self.cu_k,
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            causal: self.causal,
            scale: 1.0 / (self.head_dim as f64).sqrt(),
        }
    }

    pub fn shape(&self) -> Result<FlashAttnShape, String> {
        FlashAttnShape::of(&self.cfg()).map_err(cuda)
    }

    /// Random q, k (within 2) and v (within 1), drawn in that order.
    pub fn random_qkv(&self, rng: &mut StdRng) -> [Vec<f32>; 3] {
        let q = random(rng, self.nq, 2.0);
        let k = random(rng, self.nk, 2.0);
        let v = random(rng, self.nk, 1.0);
        [q, k, v]
    }

    /// A random output gradient (within 1).
    pub fn random_dout(&self, rng: &mut StdRng) -> Vec<f32> {
        random(rng, self.nq, 1.0)
    }

    /// The device `cu_seqlens_q`, `cu_seqlens_k`.
    pub fn upload_offsets(
        &self,
        gpu: &CudaBackend,
    ) -> Result<(CudaSlice<i32>, CudaSlice<i32>), String> {
        Ok((up(gpu, &self.cu_q)?, up(gpu, &self.cu_k)?))
    }

    /// The CPU twin's forward: `o` and `lse`.
    pub fn cpu_fwd<R: Real>(&self, q: &[R], k: &[R], v: &[R]) -> Result<(Vec<R>, Vec<R>), String> {
        let (mut o, mut lse) = (vec![R::default(); self.nq], vec![R::default(); self.rows]);
        cpu::flash_attn::attention_fwd(&self.cfg(), q, k, v, &mut o, &mut lse)
            .map_err(|e| e.to_string())?;
        Ok((o, lse))
    }

    /// The CPU twin's backward from `o` and `lse`: `[dq, dk, dv]`.
    pub fn cpu_bwd<R: Real>(
        &self,
        q: &[R],
        k: &[R],
        v: &[R],
        o: &[R],
        lse: &[R],
        dout: &[R],
    ) -> Result<[Vec<R>; 3], String> {
        let zeros = |n: usize| vec![R::default(); n];
        let [mut dq, mut dk, mut dv] = [zeros(self.nq), zeros(self.nk), zeros(self.nk)];
        cpu::flash_attn::attention_bwd(
            &self.cfg(),
            q,
            k,
            v,
            o,
            lse,
            dout,
            &mut dq,
            &mut dk,
            &mut dv,
        )
        .map_err(|e| e.to_string())?;
        Ok([dq, dk, dv])
    }
}

/// A case named `{kind} q=.. k=.. h=q_heads/kv_heads d=..[ causal]` that
/// runs `run` on the problem.
pub(crate) fn attn_case(
    kind: &str,
    p: Problem,
    run: impl Fn(&CudaBackend, &mut StdRng, &Problem) -> CaseResult + 'static,
) -> Case {
    Case {
        name: format!(
            "{kind} q={:?} k={:?} h={}/{} d={}{}",
            p.q_lens,
            p.k_lens,
            p.q_heads,
            p.kv_heads,
            p.head_dim,
            if p.causal { " causal" } else { "" }
        ),
        run: Box::new(move |gpu, rng| run(gpu, rng, &p)),
    }
}

/// Uploads `x`; an empty tensor still gets one element (the allocator
/// takes no 0).
pub(crate) fn up<T: DeviceRepr + Default>(
    gpu: &CudaBackend,
    x: &[T],
) -> Result<CudaSlice<T>, String> {
    let s = gpu.stream();
    if x.is_empty() {
        s.clone_htod(&[T::default()])
    } else {
        s.clone_htod(x)
    }
    .map_err(drv)
}

/// An output buffer of `n` (at least one) NaNs: what a kernel leaves
/// unwritten shows.
pub(crate) fn poison_bf16(gpu: &CudaBackend, n: usize) -> Result<CudaSlice<bf16>, String> {
    gpu.stream()
        .clone_htod(&vec![bf16::NAN; n.max(1)])
        .map_err(drv)
}

pub(crate) fn poison_f32(gpu: &CudaBackend, n: usize) -> Result<CudaSlice<f32>, String> {
    gpu.stream()
        .clone_htod(&vec![f32::NAN; n.max(1)])
        .map_err(drv)
}

/// Storage the CUDA-core attention kernels run on (f32, bf16), as the
/// cases upload, poison and read it back.
trait CaseElem: Elem + DeviceRepr + Default {
    const NAN: Self;
    fn widen_all(x: Vec<Self>) -> Vec<f32>;
}

impl CaseElem for f32 {
    const NAN: Self = f32::NAN;
    fn widen_all(x: Vec<Self>) -> Vec<f32> {
        x
    }
}

impl CaseElem for bf16 {
    const NAN: Self = bf16::NAN;
    fn widen_all(x: Vec<Self>) -> Vec<f32> {
        widen(&x)
    }
}

/// The CUDA-core forward, then the backward, on `T` inputs (NaN-poisoned
/// outputs): o, lse, dq, dk, dv read back as f32.
fn cuda_core_fwd_bwd<T: CaseElem>(
    gpu: &CudaBackend,
    p: &Problem,
    [q, k, v, dout]: [&[T]; 4],
) -> Result<[Vec<f32>; 5], String> {
    let (nq, nk, rows) = (p.nq, p.nk, p.rows);
    let poison = |n: usize| {
        gpu.stream()
            .clone_htod(&vec![T::NAN; n.max(1)])
            .map_err(drv)
    };
    let down = |x: &CudaSlice<T>, n: usize| -> Result<Vec<f32>, String> {
        let mut host = gpu.stream().clone_dtoh(x).map_err(drv)?;
        host.truncate(n);
        Ok(T::widen_all(host))
    };
    let shape = p.shape()?;
    let (q_d, k_d, v_d, do_d) = (up(gpu, q)?, up(gpu, k)?, up(gpu, v)?, up(gpu, dout)?);
    let (cu_q_d, cu_k_d) = p.upload_offsets(gpu)?;
    let (mut o_d, mut lse_d) = (poison(nq)?, poison_f32(gpu, rows)?);
    gpu.flash_attn_fwd(
        &shape, &q_d, &k_d, &v_d, &cu_q_d, &cu_k_d, &mut o_d, &mut lse_d,
    )
    .map_err(cuda)?;
    let (mut dq_d, mut dk_d, mut dv_d) = (poison(nq)?, poison(nk)?, poison(nk)?);
    let mut delta_d = poison_f32(gpu, rows)?;
    gpu.flash_attn_bwd(
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
        &mut dq_d,
        &mut dk_d,
        &mut dv_d,
    )
    .map_err(cuda)?;
    Ok([
        down(&o_d, nq)?,
        down_f32(gpu, &lse_d, rows)?,
        down(&dq_d, nq)?,
        down(&dk_d, nk)?,
        down(&dv_d, nk)?,
    ])
}

/// `q_lens[s]` queries against `k_lens[s]` keys per sequence.
pub fn flash_case(
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Case {
    let p = Problem::new(q_lens, k_lens, q_heads, kv_heads, head_dim, causal);
    attn_case("flash_attn fwd+bwd", p, |gpu, rng, p| {
        let [q, k, v] = p.random_qkv(rng);
        let dout = p.random_dout(rng);
        let (o_ref, lse_ref) = p.cpu_fwd(&q, &k, &v)?;
        let [dq_ref, dk_ref, dv_ref] = p.cpu_bwd(&q, &k, &v, &o_ref, &lse_ref, &dout)?;
        // dq with a single key is exactly 0 (softmax = 1): judged against f64.
        let (q64, k64, v64) = (to_f64(&q), to_f64(&k), to_f64(&v));
        let (o64, lse64) = p.cpu_fwd(&q64, &k64, &v64)?;
        let [dq64, dk64, dv64] = p.cpu_bwd(&q64, &k64, &v64, &o64, &lse64, &to_f64(&dout))?;

        let [o, lse, dq, dk, dv] = cuda_core_fwd_bwd(gpu, p, [&q, &k, &v, &dout])?;
        let e_o = check("o", &o, &o_ref, FP32_TOL)?;
        let e_l = check_lse(&lse, &lse_ref, FP32_TOL)?;
        let e_dq = check_truth("dq", &dq, &dq_ref, &dq64)?;
        let e_dk = check_truth("dk", &dk, &dk_ref, &dk64)?;
        let e_dv = check_truth("dv", &dv, &dv_ref, &dv64)?;
        Ok(format!(
            "o {e_o:.1e} lse {e_l:.1e} dq {e_dq:.1e} dk {e_dk:.1e} dv {e_dv:.1e}"
        ))
    })
}

/// bf16 storage (f32 arithmetic): inputs rounded to bf16, the CPU op on the
/// widened inputs as reference, relative error below 1e-2 (lse below 1e-5).
pub fn flash_bf16_case(
    q_lens: Vec<usize>,
    k_lens: Vec<usize>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
) -> Case {
    let p = Problem::new(q_lens, k_lens, q_heads, kv_heads, head_dim, causal);
    attn_case("flash_attn bf16 fwd+bwd", p, |gpu, rng, p| {
        let [q, k, v] = p.random_qkv(rng).map(|x| to_bf16(&x));
        let dout = to_bf16(&p.random_dout(rng));
        let (qf, kf, vf, df) = (widen(&q), widen(&k), widen(&v), widen(&dout));
        let (o_ref, lse_ref) = p.cpu_fwd(&qf, &kf, &vf)?;
        let [dq_ref, dk_ref, dv_ref] = p.cpu_bwd(&qf, &kf, &vf, &o_ref, &lse_ref, &df)?;
        let [o, lse, dq, dk, dv] = cuda_core_fwd_bwd(gpu, p, [&q, &k, &v, &dout])?;
        let e_o = check("o", &o, &o_ref, BF16_TOL)?;
        let e_l = check_lse(&lse, &lse_ref, FP32_TOL)?;
        let e_dq = check("dq", &dq, &dq_ref, BF16_TOL)?;
        let e_dk = check("dk", &dk, &dk_ref, BF16_TOL)?;
        let e_dv = check("dv", &dv, &dv_ref, BF16_TOL)?;
        Ok(format!(
            "o {e_o:.1e} lse {e_l:.1e} dq {e_dq:.1e} dk {e_dk:.1e} dv {e_dv:.1e}"
        ))
    })
}

pub fn cases() -> Vec<Case> {
    vec![
        // Vision: bidirectional, head_dim 80, windows and a full image.
        flash_case(vec![1], vec![1], 2, 2, 80, false),
        flash_case(vec![5, 64, 100, 31], vec![5, 64, 100, 31], 4, 4, 80, false),
        flash_case(vec![300], vec![300], 2, 2, 80, false),
        // Text: causal GQA, head_dim 128.
        flash_case(vec![1, 33, 130], vec![1, 33, 130], 8, 2, 128, true),
        flash_case(vec![97], vec![97], 4, 4, 128, true),
        flash_case(vec![70, 0, 45], vec![70, 0, 45], 6, 1, 128, true),
        // Fewer queries than keys (ends aligned), and more (rows that see nothing).
        flash_case(vec![3, 40], vec![8, 77], 4, 2, 128, true),
        flash_case(vec![50, 9], vec![20, 3], 4, 2, 128, true),
        flash_case(vec![7, 40], vec![33, 2], 2, 1, 80, false),
        // Small head dims (test-size models: the fixtures use 16).
        flash_case(vec![64, 48], vec![64, 48], 2, 2, 16, false),
        flash_case(vec![93], vec![93], 4, 2, 16, true),
        flash_case(vec![1, 70], vec![1, 70], 8, 8, 64, true),
    ]
}

pub fn bf16_cases() -> Vec<Case> {
    vec![
        flash_bf16_case(vec![5, 64, 100], vec![5, 64, 100], 4, 4, 80, false),
        flash_bf16_case(vec![1, 33, 130], vec![1, 33, 130], 8, 2, 128, true),
        flash_bf16_case(vec![50, 9], vec![20, 3], 4, 2, 128, true),
        flash_bf16_case(vec![93], vec![93], 4, 2, 16, true),
    ]
}
