//! Normalise + patchify a resized uint8 RGB image into the vision tower's
//! `pixel_values [N, 3*T*P*P]`, optionally with a patch-blackened copy
//! (VPPO's perturbed pass). Rows are ordered (merged row, merged col, inner
//! row, inner col), features `((c * T + t) * P + y) * P + x` with the frame
//! repeated over T; a blackened patch holds `lut[c][0]` (the normalised
//! black). GPU twin: `kernels/patch_embed.cu` (patch_embed_u8_f32).

use crate::backend::desc::{patch_is_blackened, patch_mask_threshold, PatchGeometry};

/// `img` is `[height, width, 3]`; `lut[c][byte]` the normalised value of a
/// channel byte. Returns the rows and, with `mask = (seed, p)`, the copy
/// with each patch blackened with probability `p`.
pub fn patch_embed(
    geom: &PatchGeometry,
    lut: &[[f32; 256]; 3],
    img: &[u8],
    width: usize,
    height: usize,
    mask: Option<(u64, f64)>,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let (p, m, tp) = (geom.patch, geom.merge, geom.temporal);
    assert_eq!(img.len(), width * height * 3, "patch_embed: image bytes");
    let (gh, gw) = (height / p, width / p);
    let features = 3 * tp * p * p;
    let mut out = Vec::with_capacity(gh * gw * features);
    for hb in 0..gh / m {
        for wb in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let (y0, x0) = ((hb * m + mh) * p, (wb * m + mw) * p);
                    for (c, table) in lut.iter().enumerate() {
                        for _t in 0..tp {
                            for y in 0..p {
                                let row = ((y0 + y) * width + x0) * 3;
                                out.extend((0..p).map(|x| table[img[row + x * 3 + c] as usize]));
                            }
                        }
                    }
                }
            }
        }
    }
    let masked = mask.map(|(seed, prob)| {
        let threshold = patch_mask_threshold(prob);
        let per_channel = tp * p * p;
        let mut copy = out.clone();
        for (k, patch) in copy.chunks_mut(features.max(1)).enumerate() {
            if patch_is_blackened(seed, k as u64, threshold) {
                for (c, channel) in patch.chunks_mut(per_channel).enumerate() {
                    channel.fill(lut[c][0]);
                }
            }
        }
        copy
    });
    (out, masked)
}
