//! Launchers of the embedding gather and scatter-add kernels
//! (`kernels/embedding.cu`). Each keeps the C signature it launches in a
//! comment: kernel arguments are untyped.

use super::launch_util::{elementwise_grid, need, row_grid, to_i32, Elem};
use super::{CudaBackend, CudaError};
use crate::backend::cpu::OpError;
use cudarc::driver::{CudaSlice, PushKernelArg};

impl CudaBackend {
    /// Twin of `cpu::embedding::embedding_fwd` for device-resident ids
    /// (decode feeds back sampled ids). An id outside the vocabulary gives a
    /// NaN row instead of the CPU's error.
    // embedding_fwd_{f32,bf16}(const unsigned int* ids, const T* table, T* out,
    //     int tokens, int dim, int vocab)
    #[allow(clippy::too_many_arguments)]
    pub fn embedding_fwd<T: Elem>(
        &self,
        ids: &CudaSlice<u32>,
        tokens: usize,
        table: &CudaSlice<T>,
        vocab: usize,
        dim: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<(), CudaError> {
        const K: &str = "embedding_fwd";
        need(K, "ids", ids.len(), tokens)?;
        need(K, "table", table.len(), vocab * dim)?;
        need(K, "out", out.len(), tokens * dim)?;
        if tokens * dim == 0 {
            return Ok(());
        }
        let f = self.function("embedding", &format!("embedding_fwd_{}", T::SUFFIX))?;
        let tokens_i = to_i32(K, "tokens", tokens)?;
        let dim_i = to_i32(K, "dim", dim)?;
        let vocab_i = to_i32(K, "vocab", vocab)?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(ids)
            .arg(table)
            .arg(out)
            .arg(&tokens_i)
            .arg(&dim_i)
            .arg(&vocab_i);
        // SAFETY: matches the C signature above; ids hold `tokens` u32, table
        // vocab*dim floats (ids past vocab are never read), out tokens*dim.
        unsafe { launch.launch(elementwise_grid(tokens * dim)) }?;
        Ok(())
    }

    /// Twin of `cpu::embedding::embedding_bwd`: `dtable[ids[t]] += dout[t]`,
    /// bit-identical to the CPU (each row sums its tokens in position order;
    /// no atomics). `ids` are on the host, where the token ids of a training
    /// batch live; they are grouped by id here and uploaded.
    // embedding_bwd_f32(const unsigned int* uniq_ids, const int* offsets,
    //     const int* order, const float* dout, float* dtable, int dim)
    pub fn embedding_bwd(
        &self,
        ids: &[u32],
        dout: &CudaSlice<f32>,
        dim: usize,
        dtable: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        const K: &str = "embedding_bwd";
        if dim == 0 {
            return Ok(());
        }
        let vocab = dtable.len() / dim;
        if let Some(position) = ids.iter().position(|&id| id as usize >= vocab) {
            return Err(CudaError::Unsupported {
                kernel: K,
                reason: OpError::TokenOutOfRange {
                    id: ids[position],
                    position,
                    vocab,
                }
                .to_string(),
            });
        }
        need(K, "dout", dout.len(), ids.len() * dim)?;
        if ids.is_empty() {
            return Ok(());
        }
        to_i32(K, "tokens", ids.len())?;
        let dim_i = to_i32(K, "dim", dim)?;
        let (uniq, offsets, order) = group_by_id(ids);
        let uniq_d = self.stream.clone_htod(&uniq)?;
        let offsets_d = self.stream.clone_htod(&offsets)?;
        let order_d = self.stream.clone_htod(&order)?;
        let f = self.function("embedding", "embedding_bwd_f32")?;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&uniq_d)
            .arg(&offsets_d)
            .arg(&order_d)
            .arg(dout)
            .arg(dtable)
            .arg(&dim_i);
        // SAFETY: matches the C signature above; every id is below vocab
        // (checked), offsets has uniq+1 entries delimiting `order`, whose
        // entries index rows of dout.
        unsafe { launch.launch(row_grid(uniq.len(), 256)) }?;
        Ok(())
    }
}

/// Groups token positions by id: distinct ids, offsets into `order`, and the
/// positions of each id in increasing order.
fn group_by_id(ids: &[u32]) -> (Vec<u32>, Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..ids.len() as i32).collect();
    order.sort_by_key(|&t| (ids[t as usize], t));
    let mut uniq = Vec::new();
    let mut offsets = Vec::new();
    for (k, &t) in order.iter().enumerate() {
        let id = ids[t as usize];
        if uniq.last() != Some(&id) {
            uniq.push(id);
            offsets.push(k as i32);
        }
    }
    offsets.push(order.len() as i32);
    (uniq, offsets, order)
}

#[cfg(test)]
mod tests {
    use super::group_by_id;

    #[test]
    fn tokens_group_by_id_in_position_order() {
        let (uniq, offsets, order) = group_by_id(&[5, 2, 5, 0, 2, 5]);
        assert_eq!(uniq, vec![0, 2, 5]);
        assert_eq!(offsets, vec![0, 1, 3, 6]);
        assert_eq!(order, vec![3, 1, 4, 0, 2, 5]);
    }
}
