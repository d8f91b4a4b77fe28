//! Row movement and the residual add over row-major `[rows, width]`
//! buffers. GPU twin: `kernels/rows.cu` (gather_rows, scatter_rows,
//! add_inplace).

use rayon::prelude::*;

/// `out[i] = src[idx[i]]`, rows of `width`.
pub fn gather_rows<R: Copy + Send + Sync>(src: &[R], idx: &[i32], width: usize, out: &mut [R]) {
    assert_eq!(out.len(), idx.len() * width, "gather_rows: output length");
    let copy = |(dst, &i): (&mut [R], &i32)| {
        let i = i as usize;
        dst.copy_from_slice(&src[i * width..(i + 1) * width]);
    };
    // Threads only pay off on large copies (small ones are all wake-up).
    if out.len() < PARALLEL_MIN_ELEMS {
        out.chunks_mut(width.max(1)).zip(idx).for_each(copy);
    } else {
        out.par_chunks_mut(width.max(1))
            .zip(idx.par_iter())
            .for_each(copy);
    }
}

/// Below this many elements a row op runs on the calling thread.
pub const PARALLEL_MIN_ELEMS: usize = 1 << 16;

/// `dst[idx[i]] = src[i]`, rows of `width` (indices distinct).
pub fn scatter_rows<R: Copy>(src: &[R], idx: &[i32], width: usize, dst: &mut [R]) {
    assert_eq!(src.len(), idx.len() * width, "scatter_rows: source length");
    for (k, &i) in idx.iter().enumerate() {
        let i = i as usize;
        dst[i * width..(i + 1) * width].copy_from_slice(&src[k * width..(k + 1) * width]);
    }
}

/// `acc += x`, elementwise.
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len(), "add_inplace: lengths differ");
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
