//! Rotary position embedding on `[tokens, heads, head_dim]` tensors, with the
//! three angle layouts Qwen2.5-VL uses: plain 1D, M-RoPE (t/h/w streams by
//! frequency section) and the vision tower's 2D (row | col).
//!
//! Rotation (HF's `rotate_half` convention): with `c, s` the cos/sin of the
//! angle of frequency `j < half`, `y[j] = x[j] c - x[j+half] s` and
//! `y[j+half] = x[j+half] c + x[j] s`.
//! GPU twin: `kernels/rope.cu` (`rope_f32`), which computes the cos/sin on
//! the fly from the integer positions and a [`RopeFreqs`] plan.

use super::Real;
use crate::backend::desc::RopeFreqs;
use rayon::prelude::*;

/// Per-token cos/sin of every rotary frequency: `[tokens, half]` each, with
/// `half = head_dim / 2`.
#[derive(Debug, Clone)]
pub struct RopeTable<R> {
    pub cos: Vec<R>,
    pub sin: Vec<R>,
    pub tokens: usize,
    pub half: usize,
}

/// `inv_freq[j] = 1 / theta^(2j / dim)` for `j < dim / 2`.
fn inv_freq<R: Real>(dim: usize, theta: f64) -> Vec<R> {
    (0..dim / 2)
        .map(|j| R::one() / R::from_f64(theta).powf(R::from_f64((2 * j) as f64 / dim as f64)))
        .collect()
}

impl<R: Real> RopeTable<R> {
    /// Builds a table from each token's angle for each frequency.
    fn from_angles(tokens: usize, half: usize, angle: impl Fn(usize, usize) -> R + Sync) -> Self {
        let mut cos = vec![R::zero(); tokens * half];
        let mut sin = vec![R::zero(); tokens * half];
        cos.par_chunks_mut(half.max(1))
            .zip(sin.par_chunks_mut(half.max(1)))
            .enumerate()
            .for_each(|(t, (c, s))| {
                for j in 0..half {
                    let a = angle(t, j);
                    c[j] = a.cos();
                    s[j] = a.sin();
                }
            });
        Self {
            cos,
            sin,
            tokens,
            half,
        }
    }

    /// Ordinary 1D RoPE: angle `pos[t] * inv_freq[j]`.
    pub fn text_1d(positions: &[i32], head_dim: usize, theta: f64) -> Self {
        assert!(head_dim % 2 == 0, "rope: head_dim must be even");
        let f = inv_freq::<R>(head_dim, theta);
        Self::from_angles(positions.len(), head_dim / 2, |t, j| {
            R::from_f64(positions[t] as f64) * f[j]
        })
    }

    /// M-RoPE: three position streams (t, h, w); frequency `j` reads the
    /// stream whose contiguous section contains it (`sections` sum to
    /// `head_dim / 2`, e.g. `[16, 24, 24]` for head_dim 128).
    pub fn mrope(
        positions: [&[i32]; 3],
        sections: [usize; 3],
        head_dim: usize,
        theta: f64,
    ) -> Self {
        let half = head_dim / 2;
        assert!(head_dim % 2 == 0, "rope: head_dim must be even");
        assert_eq!(
            sections.iter().sum::<usize>(),
            half,
            "mrope: sections must sum to head_dim/2"
        );
        let tokens = positions[0].len();
        assert!(
            positions.iter().all(|p| p.len() == tokens),
            "mrope: streams differ in length"
        );
        let stream_of: Vec<usize> = (0..3)
            .flat_map(|s| std::iter::repeat_n(s, sections[s]))
            .collect();
        let f = inv_freq::<R>(head_dim, theta);
        Self::from_angles(tokens, half, |t, j| {
            R::from_f64(positions[stream_of[j]][t] as f64) * f[j]
        })
    }

    /// Vision 2D RoPE: the rotary dim is `head_dim / 2` with
    /// `inv_freq[i] = 1 / theta^(2i / (head_dim/2))`; each patch's angles are
    /// `[row * inv_freq | col * inv_freq]` (`head_dim / 2` angles in all).
    pub fn vision_2d(rows: &[i32], cols: &[i32], head_dim: usize, theta: f64) -> Self {
        assert!(
            head_dim % 4 == 0,
            "vision rope: head_dim must be a multiple of 4"
        );
        assert_eq!(
            rows.len(),
            cols.len(),
            "vision rope: rows and cols differ in length"
        );
        let half = head_dim / 2;
        let f = inv_freq::<R>(half, theta);
        let nf = f.len();
        Self::from_angles(rows.len(), half, |t, j| {
            if j < nf {
                R::from_f64(rows[t] as f64) * f[j]
            } else {
                R::from_f64(cols[t] as f64) * f[j - nf]
            }
        })
    }
}

/// Applies the rotation to `x[tokens, heads, 2 * half]`, writing `y`.
pub fn rope_fwd<R: Real>(table: &RopeTable<R>, x: &[R], heads: usize, y: &mut [R]) {
    rotate(table, x, heads, y, R::one());
}

/// Backward: the inverse rotation of `dy` (rotation by `-angle`).
pub fn rope_bwd<R: Real>(table: &RopeTable<R>, dy: &[R], heads: usize, dx: &mut [R]) {
    rotate(table, dy, heads, dx, -R::one());
}

fn rotate<R: Real>(table: &RopeTable<R>, x: &[R], heads: usize, y: &mut [R], sin_sign: R) {
    let half = table.half;
    let row = heads * 2 * half;
    assert_eq!(
        x.len(),
        table.tokens * row,
        "rope: input is not [tokens, heads, head_dim]"
    );
    assert_eq!(y.len(), x.len(), "rope: output length");
    if row == 0 {
        return;
    }
    y.par_chunks_mut(row)
        .zip(x.par_chunks(row))
        .enumerate()
        .for_each(|(t, (yt, xt))| {
            let c = &table.cos[t * half..(t + 1) * half];
            let s = &table.sin[t * half..(t + 1) * half];
            for h in 0..heads {
                let base = h * 2 * half;
                for j in 0..half {
                    let (x1, x2) = (xt[base + j], xt[base + j + half]);
                    let sj = s[j] * sin_sign;
                    yt[base + j] = x1 * c[j] - x2 * sj;
                    yt[base + j + half] = x2 * c[j] + x1 * sj;
                }
            }
        });
}

impl RopeFreqs {
    /// The table these frequencies give for `positions` (one slice per stream).
    pub fn table(&self, positions: &[&[i32]]) -> RopeTable<f32> {
        let tokens = positions.first().map_or(0, |p| p.len());
        assert!(
            positions.iter().all(|p| p.len() == tokens),
            "rope: streams differ in length"
        );
        assert!(
            self.stream.iter().all(|&s| (s as usize) < positions.len()),
            "rope: a frequency reads a missing stream"
        );
        RopeTable::from_angles(tokens, self.inv_freq.len(), |t, j| {
            positions[self.stream[j] as usize][t] as f32 * self.inv_freq[j]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &RopeTable<f32>, b: &RopeTable<f32>) {
        assert_eq!((a.tokens, a.half), (b.tokens, b.half));
        assert_eq!(a.cos, b.cos);
        assert_eq!(a.sin, b.sin);
    }

    #[test]
    fn freq_plans_rebuild_the_tables_bit_for_bit() {
        let p0: Vec<i32> = (0..37).map(|i| i * 7 % 29).collect();
        let p1: Vec<i32> = (0..37).map(|i| i / 3).collect();
        let p2: Vec<i32> = (0..37).map(|i| 1000 + i).collect();
        same(
            &RopeFreqs::text_1d(128, 1e6).table(&[&p2]),
            &RopeTable::text_1d(&p2, 128, 1e6),
        );
        same(
            &RopeFreqs::mrope([16, 24, 24], 128, 1e6).table(&[&p0, &p1, &p2]),
            &RopeTable::mrope([&p0, &p1, &p2], [16, 24, 24], 128, 1e6),
        );
        same(
            &RopeFreqs::vision_2d(80, 1e4).table(&[&p0, &p1]),
            &RopeTable::vision_2d(&p0, &p1, 80, 1e4),
        );
    }
}
