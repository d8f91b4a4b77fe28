//! The perturbed image of VPPO's second pass: the resized image walked in
//! 14x14 tiles, each set to black with probability p, a fresh mask per
//! response. Tiles are exactly the vision patches, so the perturbation acts
//! on `pixel_values` rows directly (the GPU's fused dual forward does the
//! same inside the patch-embed kernel); image size and token ids are unchanged.

use crate::processor::image::ImageProcessorConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Normalised value of a black pixel per channel: `(0 - mean) / std`.
fn black(cfg: &ImageProcessorConfig) -> [f32; 3] {
    let x = 0.0f32;
    [0, 1, 2].map(|c| (x - cfg.image_mean[c]) / cfg.image_std[c])
}

/// Blackens each patch row of `pixel_values[N, C*T*P*P]` with probability
/// `p`, from a generator seeded with `seed`; returns how many were blackened.
pub fn blacken_patches(
    pixel_values: &mut [f32],
    cfg: &ImageProcessorConfig,
    p: f64,
    seed: u64,
) -> usize {
    let per_channel = cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
    let row = 3 * per_channel;
    assert_eq!(
        pixel_values.len() % row,
        0,
        "pixel_values rows are not patches"
    );
    let values = black(cfg);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut count = 0;
    for patch in pixel_values.chunks_mut(row) {
        if rng.random_bool(p) {
            for (c, channel) in patch.chunks_mut(per_channel).enumerate() {
                channel.fill(values[c]);
            }
            count += 1;
        }
    }
    count
}

/// The patch-mask threshold of probability `p`: patch `k` is blackened when
/// its 24-bit hash is below it (so p = 0 never, p = 1 always).
pub fn patch_mask_threshold(p: f64) -> u32 {
    (p.clamp(0.0, 1.0) * (1u64 << 24) as f64).round() as u32
}

/// Counter-based draw for patch `patch` of the sample seeded `seed`
/// (splitmix64 of the pair): the same on the CPU and in the GPU patch-embed
/// kernel (`kernels/patch_embed.cu`), with no generator state to carry.
pub fn patch_is_blackened(seed: u64, patch: u64, threshold: u32) -> bool {
    let mut z = seed.wrapping_add((patch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as u32) < threshold
}

/// [`blacken_patches`] with the counter-based mask of [`patch_is_blackened`]
/// instead of a generator: the CPU twin of the masked output of the GPU
/// patch-embed kernel. Returns how many patches were blackened.
pub fn blacken_patches_hashed(
    pixel_values: &mut [f32],
    cfg: &ImageProcessorConfig,
    p: f64,
    seed: u64,
) -> usize {
    let per_channel = cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
    let row = 3 * per_channel;
    assert_eq!(
        pixel_values.len() % row,
        0,
        "pixel_values rows are not patches"
    );
    let values = black(cfg);
    let threshold = patch_mask_threshold(p);
    let mut count = 0;
    for (k, patch) in pixel_values.chunks_mut(row).enumerate() {
        if patch_is_blackened(seed, k as u64, threshold) {
            for (c, channel) in patch.chunks_mut(per_channel).enumerate() {
                channel.fill(values[c]);
            }
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_mask_is_seeded_and_has_the_right_rate() {
        let t = patch_mask_threshold(0.3);
        let hits = (0..100_000u64)
            .filter(|&k| patch_is_blackened(7, k, t))
            .count();
        assert!((29_000..31_000).contains(&hits), "{hits}");
        let a: Vec<bool> = (0..64).map(|k| patch_is_blackened(7, k, t)).collect();
        let b: Vec<bool> = (0..64).map(|k| patch_is_blackened(8, k, t)).collect();
        assert_ne!(a, b);
        assert!((0..1000).all(|k| !patch_is_blackened(3, k, patch_mask_threshold(0.0))));
        assert!((0..1000).all(|k| patch_is_blackened(3, k, patch_mask_threshold(1.0))));
        // Blackened rows hold the normalised black of each channel.
        let cfg = ImageProcessorConfig::default();
        let row = 3 * 2 * 14 * 14;
        let mut pv = vec![0.5f32; 16 * row];
        let n = blacken_patches_hashed(&mut pv, &cfg, 0.5, 11);
        let dark = pv.chunks(row).filter(|r| r[0] != 0.5).count();
        assert_eq!(n, dark);
        assert!(pv
            .chunks(row)
            .all(|r| r[0] == 0.5 || r[0] == black(&cfg)[0]));
    }
    use crate::processor::image::{patchify, RgbImage};

    #[test]
    fn blackened_patches_equal_patchifying_a_blackened_image() {
        let cfg = ImageProcessorConfig::default();
        let (w, h) = (56, 28); // 4 x 2 patches
        let img = RgbImage {
            width: w,
            height: h,
            data: (0..w * h * 3).map(|i| (i * 7 % 251) as u8 + 1).collect(),
        };
        let mut pv = patchify(&img, &cfg);
        let n = blacken_patches(&mut pv, &cfg, 0.5, 3);
        assert!(n > 0 && n < 8, "{n} of 8 patches");
        // Rebuild the image with the same tiles black and patchify it.
        let row = pv.len() / 8;
        let black_px = [0u8; 3];
        let mut dark = img.clone();
        let reference = patchify(&img, &cfg);
        for (k, patch) in pv.chunks(row).enumerate() {
            if patch != &reference[k * row..(k + 1) * row] {
                // Patch k in processor order: merge blocks of 2x2.
                let (blk, inner) = (k / 4, k % 4);
                let (py, px) = (inner / 2, (blk % 2) * 2 + inner % 2);
                for y in py * 14..(py + 1) * 14 {
                    for x in px * 14..(px + 1) * 14 {
                        dark.data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&black_px);
                    }
                }
            }
        }
        assert_eq!(patchify(&dark, &cfg), pv);
        // Same seed, same mask; another seed, another mask.
        let mut again = reference.clone();
        blacken_patches(&mut again, &cfg, 0.5, 3);
        assert_eq!(again, pv);
        let mut other = reference.clone();
        blacken_patches(&mut other, &cfg, 0.5, 4);
        assert_ne!(other, pv);
    }
}
