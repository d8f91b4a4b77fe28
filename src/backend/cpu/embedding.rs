//! Token embedding lookup; its backward is a scatter-add into the table.
//! GPU twin: `kernels/embedding.cu` (embedding_fwd_f32, embedding_bwd_f32).

use super::{OpError, Real, SharedMut};
use rayon::prelude::*;

fn check_ids(ids: &[u32], vocab: usize) -> Result<(), OpError> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(position) => Err(OpError::TokenOutOfRange {
            id: ids[position],
            position,
            vocab,
        }),
        None => Ok(()),
    }
}

/// `out[t] = table[ids[t]]` for a `[vocab, dim]` table.
pub fn embedding_fwd<R: Real>(
    ids: &[u32],
    table: &[R],
    dim: usize,
    out: &mut [R],
) -> Result<(), OpError> {
    assert!(
        dim > 0 && table.len() % dim == 0,
        "embedding: table is not [vocab, dim]"
    );
    assert_eq!(out.len(), ids.len() * dim, "embedding: output length");
    check_ids(ids, table.len() / dim)?;
    out.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let at = id as usize * dim;
            row.copy_from_slice(&table[at..at + dim]);
        });
    Ok(())
}

/// `dtable[ids[t]] += dout[t]` (accumulates; repeated ids add up).
pub fn embedding_bwd<R: Real>(
    ids: &[u32],
    dout: &[R],
    dim: usize,
    dtable: &mut [R],
) -> Result<(), OpError> {
    assert!(
        dim > 0 && dtable.len() % dim == 0,
        "embedding: table grad is not [vocab, dim]"
    );
    assert_eq!(dout.len(), ids.len() * dim, "embedding: dout length");
    check_ids(ids, dtable.len() / dim)?;
    // Parallel over feature columns: every thread walks all tokens in order,
    // so repeated ids accumulate deterministically without locks.
    let columns = rayon::current_num_threads().max(1);
    let width = dim.div_ceil(columns);
    let table = SharedMut(dtable.as_mut_ptr());
    (0..dim.div_ceil(width)).into_par_iter().for_each(|c| {
        let (c0, c1) = (c * width, ((c + 1) * width).min(dim));
        for (t, &id) in ids.iter().enumerate() {
            let row = id as usize * dim;
            for i in c0..c1 {
                // SAFETY: ids were checked against the table size, and column
                // ranges [c0, c1) are disjoint across tasks, so each element
                // is written by exactly one task.
                unsafe { *table.get().add(row + i) += dout[t * dim + i] };
            }
        }
    });
    Ok(())
}
