//! Launchers of the optimizer kernels (`kernels/adamw.cu`): multi-tensor
//! AdamW on fp32 masters and the global gradient norm. Each keeps the C
//! signature it launches in a comment: kernel arguments are untyped.

use super::launch_util::to_i32;
use super::{CudaBackend, CudaError};
use crate::backend::desc::AdamWConfig;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, SyncOnDrop};
use half::bf16;

/// Elements each block of the multi-tensor kernels works on.
const CHUNK: usize = 16_384;
const THREADS: u32 = 256;

/// One parameter tensor of a multi-tensor AdamW step.
pub struct AdamWTensor<'a> {
    pub param: &'a mut CudaSlice<f32>,
    pub grad: &'a CudaSlice<f32>,
    pub exp_avg: &'a mut CudaSlice<f32>,
    pub exp_avg_sq: &'a mut CudaSlice<f32>,
    /// Receives the updated weights rounded to bf16, when given.
    pub model: Option<&'a mut CudaSlice<bf16>>,
}

/// Block -> (tensor, chunk) maps for tensors of the given lengths.
fn block_map(lens: &[usize]) -> (Vec<i32>, Vec<i32>) {
    let mut tensor = Vec::new();
    let mut chunk = Vec::new();
    for (t, &n) in lens.iter().enumerate() {
        for c in 0..n.div_ceil(CHUNK) {
            tensor.push(t as i32);
            chunk.push(c as i32);
        }
    }
    (tensor, chunk)
}

fn grid(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaBackend {
    /// Twin of `cpu::adamw::adamw_step` on every tensor at once (after the
    /// gradients are multiplied by `grad_scale`, see `backend::desc::clip_coefficient`),
    /// bit-identical to the CPU.
    // adamw_multi_f32(const unsigned long long* desc, const int* block_tensor,
    //     const int* block_chunk, int chunk, float decay, float one_minus_b1,
    //     float b2, float one_minus_b2, float step_size, float bias2_sqrt,
    //     float eps, float grad_scale)
    pub fn adamw_step(
        &self,
        cfg: &AdamWConfig,
        step: u64,
        grad_scale: f32,
        tensors: &mut [AdamWTensor],
    ) -> Result<(), CudaError> {
        const K: &str = "adamw_step";
        let bad = |reason: String| Err(CudaError::Unsupported { kernel: K, reason });
        if step == 0 {
            return bad("step counts from 1".into());
        }
        let step_i = to_i32(K, "step", step as usize)?;
        for (i, t) in tensors.iter().enumerate() {
            let n = t.param.len();
            if t.grad.len() != n || t.exp_avg.len() != n || t.exp_avg_sq.len() != n {
                return bad(format!("tensor {i}: lengths differ"));
            }
            if t.model.as_ref().is_some_and(|m| m.len() != n) {
                return bad(format!("tensor {i}: model copy length"));
            }
        }
        let lens: Vec<usize> = tensors.iter().map(|t| t.param.len()).collect();
        let (block_tensor, block_chunk) = block_map(&lens);
        if block_tensor.is_empty() {
            return Ok(());
        }
        // The scalars, formed exactly as the CPU forms them.
        let decay = (1.0 - cfg.lr * cfg.weight_decay) as f32;
        let one_minus_b1 = (1.0 - cfg.beta1) as f32;
        let b2 = cfg.beta2 as f32;
        let one_minus_b2 = (1.0 - cfg.beta2) as f32;
        let bias1 = 1.0 - cfg.beta1.powi(step_i);
        let bias2_sqrt = (1.0 - cfg.beta2.powi(step_i)).sqrt() as f32;
        let step_size = (cfg.lr / bias1) as f32;
        let eps = cfg.eps as f32;

        let stream = &self.stream;
        let mut desc: Vec<u64> = Vec::with_capacity(tensors.len() * 6);
        let mut guards: Vec<SyncOnDrop> = Vec::new();
        for t in tensors.iter_mut() {
            let n = t.param.len() as u64;
            let (p, gp) = t.param.device_ptr_mut(stream);
            let (g, gg) = t.grad.device_ptr(stream);
            let (m, gm) = t.exp_avg.device_ptr_mut(stream);
            let (v, gv) = t.exp_avg_sq.device_ptr_mut(stream);
            let model = match t.model.as_mut() {
                Some(w) => {
                    let (w, gw) = w.device_ptr_mut(stream);
                    guards.push(gw);
                    w
                }
                None => 0,
            };
            desc.extend([p, g, m, v, model, n]);
            guards.extend([gp, gg, gm, gv]);
        }
        let desc_d = stream.clone_htod(&desc)?;
        let tensor_d = stream.clone_htod(&block_tensor)?;
        let chunk_d = stream.clone_htod(&block_chunk)?;
        let f = self.function("adamw", "adamw_multi_f32")?;
        let chunk = CHUNK as i32;
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(&desc_d)
            .arg(&tensor_d)
            .arg(&chunk_d)
            .arg(&chunk)
            .arg(&decay)
            .arg(&one_minus_b1)
            .arg(&b2)
            .arg(&one_minus_b2)
            .arg(&step_size)
            .arg(&bias2_sqrt)
            .arg(&eps)
            .arg(&grad_scale);
        // SAFETY: matches the C signature above; desc holds 6 u64 per tensor:
        // live device pointers of n-element buffers (guards held until after
        // the launch), and the block maps stay inside each tensor.
        unsafe { launch.launch(grid(block_tensor.len())) }?;
        drop(guards);
        Ok(())
    }

    /// Twin of `cpu::adamw::global_grad_norm`: the L2 norm over all the
    /// gradients together, squares summed in f64 in a fixed order.
    // grad_sumsq_multi_f32(const unsigned long long* desc, const int* block_tensor,
    //     const int* block_chunk, int chunk, double* partial)
    // sum_f64(const double* partial, int n, double* out)
    pub fn global_grad_norm(&self, grads: &[&CudaSlice<f32>]) -> Result<f64, CudaError> {
        const K: &str = "global_grad_norm";
        let lens: Vec<usize> = grads.iter().map(|g| g.len()).collect();
        let (block_tensor, block_chunk) = block_map(&lens);
        if block_tensor.is_empty() {
            return Ok(0.0);
        }
        let blocks = to_i32(K, "blocks", block_tensor.len())?;
        let stream = &self.stream;
        let mut desc: Vec<u64> = Vec::with_capacity(grads.len() * 6);
        let mut guards: Vec<SyncOnDrop> = Vec::new();
        for g in grads {
            let (p, guard) = g.device_ptr(stream);
            desc.extend([0, p, 0, 0, 0, g.len() as u64]);
            guards.push(guard);
        }
        let desc_d = stream.clone_htod(&desc)?;
        let tensor_d = stream.clone_htod(&block_tensor)?;
        let chunk_d = stream.clone_htod(&block_chunk)?;
        let mut partial = stream.alloc_zeros::<f64>(block_tensor.len())?;
        let mut total = stream.alloc_zeros::<f64>(1)?;
        let f = self.function("adamw", "grad_sumsq_multi_f32")?;
        let chunk = CHUNK as i32;
        let mut launch = stream.launch_builder(&f);
        launch
            .arg(&desc_d)
            .arg(&tensor_d)
            .arg(&chunk_d)
            .arg(&chunk)
            .arg(&mut partial);
        // SAFETY: matches the C signature above; desc holds live gradient
        // pointers and lengths (guards held), partial one f64 per block.
        unsafe { launch.launch(grid(block_tensor.len())) }?;
        drop(guards);
        let f = self.function("adamw", "sum_f64")?;
        let mut launch = stream.launch_builder(&f);
        launch.arg(&partial).arg(&blocks).arg(&mut total);
        // SAFETY: matches the C signature above; one block reads `blocks`
        // partials and writes one f64.
        unsafe { launch.launch(grid(1)) }?;
        let sum = stream.clone_dtoh(&total)?;
        Ok(sum[0].sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_every_tensor_chunk() {
        let (t, c) = block_map(&[1, 0, CHUNK, CHUNK + 1]);
        assert_eq!(t, vec![0, 2, 3, 3]);
        assert_eq!(c, vec![0, 0, 0, 1]);
    }
}
