//! Position bookkeeping: M-RoPE position ids of a token sequence with images
//! (transformers' `get_rope_index`), and the vision tower's per-patch (row,
//! col) and window permutation (`rot_pos_emb`, `get_window_index`).

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PositionError {
    #[error("the sequence has more image token runs than the {images} image(s) given")]
    TooFewImages { images: usize },
    #[error(
        "image {image} needs {expected} consecutive image tokens at position {at}, found {found}"
    )]
    ShortImageRun {
        image: usize,
        at: usize,
        expected: usize,
        found: usize,
    },
    #[error("{unused} image(s) have no image tokens in the sequence")]
    UnusedImages { unused: usize },
}

/// Position ids on the three M-RoPE streams (t, h, w) of one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MropePositions {
    pub t: Vec<i32>,
    pub h: Vec<i32>,
    pub w: Vec<i32>,
    /// `max position + 1 - len`: decoding continues at `i + rope_delta`.
    pub rope_delta: i64,
}

/// Text tokens count up on all streams; an image of merged grid
/// `(gh, gw)` starting at position `p` takes `t = p`, `h = p + row`,
/// `w = p + col`, and the next text continues at `p + max(gh, gw)`.
/// `grids` are patch grids `(t, h, w)`; `merge` is the spatial merge size.
pub fn mrope_positions(
    ids: &[u32],
    image_token_id: u32,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<MropePositions, PositionError> {
    let n = ids.len();
    let (mut t, mut h, mut w) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut next: i64 = 0;
    let mut i = 0;
    let mut image = 0;
    while i < n {
        if ids[i] != image_token_id {
            t.push(next as i32);
            h.push(next as i32);
            w.push(next as i32);
            next += 1;
            i += 1;
            continue;
        }
        let grid = grids.get(image).ok_or(PositionError::TooFewImages {
            images: grids.len(),
        })?;
        let (gt, gh, gw) = (grid[0], grid[1] / merge, grid[2] / merge);
        let count = gt * gh * gw;
        let run = ids[i..]
            .iter()
            .take(count)
            .take_while(|&&id| id == image_token_id)
            .count();
        if run != count {
            return Err(PositionError::ShortImageRun {
                image,
                at: i,
                expected: count,
                found: run,
            });
        }
        let mut max = next;
        for _ti in 0..gt {
            for r in 0..gh {
                for c in 0..gw {
                    // Images have no temporal extent: every frame's t is `next`.
                    t.push(next as i32);
                    h.push((next + r as i64) as i32);
                    w.push((next + c as i64) as i32);
                    max = max.max(next + r.max(c) as i64);
                }
            }
        }
        next = max + 1;
        i += count;
        image += 1;
    }
    if image < grids.len() {
        return Err(PositionError::UnusedImages {
            unused: grids.len() - image,
        });
    }
    Ok(MropePositions {
        t,
        h,
        w,
        rope_delta: next - n as i64,
    })
}

/// Patch positions and window layout of the images of one vision batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisionLayout {
    /// Row and column of every patch, in processor order (merge blocks of
    /// `merge x merge` patches consecutive).
    pub rows: Vec<i32>,
    pub cols: Vec<i32>,
    /// Merged-token permutation: windowed position `i` holds merged token
    /// `window_index[i]` (windows in raster order, raster inside a window).
    pub window_index: Vec<usize>,
    /// Patch offsets of the (non-empty) windows, in windowed order.
    pub cu_window: Vec<i32>,
    /// Patch offsets of whole images (frames), for full-attention blocks.
    pub cu_full: Vec<i32>,
}

impl VisionLayout {
    pub fn new(grids: &[[usize; 3]], merge: usize, window: usize) -> Self {
        let mut layout = VisionLayout {
            rows: Vec::new(),
            cols: Vec::new(),
            window_index: Vec::new(),
            cu_window: vec![0],
            cu_full: vec![0],
        };
        let unit = (merge * merge) as i32;
        let mut merged_offset = 0;
        for &[gt, gh, gw] in grids {
            for _ in 0..gt {
                for hb in 0..gh / merge {
                    for wb in 0..gw / merge {
                        for mh in 0..merge {
                            for mw in 0..merge {
                                layout.rows.push((hb * merge + mh) as i32);
                                layout.cols.push((wb * merge + mw) as i32);
                            }
                        }
                    }
                }
                let last = *layout.cu_full.last().unwrap();
                layout.cu_full.push(last + (gh * gw) as i32);
            }
            let (lh, lw) = (gh / merge, gw / merge);
            for f in 0..gt {
                for wr in 0..lh.div_ceil(window) {
                    for wc in 0..lw.div_ceil(window) {
                        let mut size = 0;
                        for r in wr * window..((wr + 1) * window).min(lh) {
                            for c in wc * window..((wc + 1) * window).min(lw) {
                                layout
                                    .window_index
                                    .push(merged_offset + f * lh * lw + r * lw + c);
                                size += 1;
                            }
                        }
                        let last = *layout.cu_window.last().unwrap();
                        layout.cu_window.push(last + size * unit);
                    }
                }
            }
            merged_offset += gt * lh * lw;
        }
        layout
    }

    /// Patch permutation matching `window_index` (groups of `unit` patches move together).
    pub fn patch_order(&self, unit: usize) -> Vec<usize> {
        self.window_index
            .iter()
            .flat_map(|&m| (0..unit).map(move |u| m * unit + u))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_only_positions_count_up() {
        let p = mrope_positions(&[5, 6, 7], 9, &[], 2).unwrap();
        assert_eq!(p.t, vec![0, 1, 2]);
        assert_eq!(p.h, p.t);
        assert_eq!(p.rope_delta, 0);
    }

    #[test]
    fn image_positions_follow_the_merged_grid() {
        // 2 text tokens, a 2x3 merged image (patch grid 4x6), 1 text token.
        let ids = [1, 2, 9, 9, 9, 9, 9, 9, 3];
        let p = mrope_positions(&ids, 9, &[[1, 4, 6]], 2).unwrap();
        assert_eq!(p.t, vec![0, 1, 2, 2, 2, 2, 2, 2, 5]);
        assert_eq!(p.h, vec![0, 1, 2, 2, 2, 3, 3, 3, 5]);
        assert_eq!(p.w, vec![0, 1, 2, 3, 4, 2, 3, 4, 5]);
        assert_eq!(p.rope_delta, 6 - 9);
    }

    #[test]
    fn mismatched_images_are_errors() {
        assert_eq!(
            mrope_positions(&[9, 9], 9, &[], 2),
            Err(PositionError::TooFewImages { images: 0 })
        );
        assert!(matches!(
            mrope_positions(&[9, 9, 1], 9, &[[1, 4, 4]], 2),
            Err(PositionError::ShortImageRun {
                expected: 4,
                found: 2,
                ..
            })
        ));
        assert_eq!(
            mrope_positions(&[1], 9, &[[1, 2, 2]], 2),
            Err(PositionError::UnusedImages { unused: 1 })
        );
    }

    #[test]
    fn windows_cover_partial_edges() {
        // 5x7 merged tokens with 4x4 windows: windows of 16, 12, 4, 3 tokens.
        let l = VisionLayout::new(&[[1, 10, 14]], 2, 4);
        assert_eq!(l.cu_window, vec![0, 64, 112, 128, 140]);
        assert_eq!(l.cu_full, vec![0, 140]);
        assert_eq!(&l.window_index[..5], &[0, 1, 2, 3, 7]);
        let mut sorted = l.window_index.clone();
        sorted.sort();
        assert_eq!(sorted, (0..35).collect::<Vec<_>>());
        // Merge blocks are consecutive: patches 0..4 are (0,0) (0,1) (1,0) (1,1).
        assert_eq!(&l.rows[..4], &[0, 0, 1, 1]);
        assert_eq!(&l.cols[..4], &[0, 1, 0, 1]);
    }
}
