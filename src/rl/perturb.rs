//! The perturbed image of VPPO's second pass: the resized image walked in
//! 14x14 tiles, each set to black with probability p, a fresh mask per
//! response. Tiles are exactly the vision patches, so the perturbation acts
//! on `pixel_values` rows directly (the GPU's fused dual forward does the
//! same inside the patch-embed kernel); image size and token ids are unchanged.

use crate::processor::image::{patchify, ImageProcessorConfig, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What replaces a perturbed patch. The reference (and default) blackens it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Perturbation {
    #[default]
    Black,
    /// Mid grey (pixel value 128).
    Grey,
    /// Independent uniform pixel values.
    Noise,
    /// The patch's mean colour (a box blur over the whole tile).
    Blur,
}

/// Normalised value of pixel value `x` (0..=255) per channel.
fn normalised(cfg: &ImageProcessorConfig, x: f32) -> [f32; 3] {
    let v = x * cfg.rescale_factor as f32;
    [0, 1, 2].map(|c| (v - cfg.image_mean[c]) / cfg.image_std[c])
}

/// Blackens each patch row of `pixel_values[N, C*T*P*P]` (one image) with
/// probability `p` ([`perturb_patches`] with black): the CPU twin of the
/// masked output of the GPU patch-embed kernel. Returns how many were
/// blackened.
pub fn blacken_patches(
    pixel_values: &mut [f32],
    cfg: &ImageProcessorConfig,
    p: f64,
    seed: u64,
) -> usize {
    perturb_patches(pixel_values, cfg, Perturbation::Black, p, seed)
}

/// Perturbs each patch row of `pixel_values[N, C*T*P*P]` (ONE image's
/// rows) with probability `p`, patch `k` chosen by the counter-based draw
/// [`patch_is_blackened`]`(seed, k)` that the GPU patch-embed kernel makes
/// too. Which patches are chosen depends only on `seed` and `p` (the same
/// tiles for every kind); returns how many were perturbed.
pub fn perturb_patches(
    pixel_values: &mut [f32],
    cfg: &ImageProcessorConfig,
    kind: Perturbation,
    p: f64,
    seed: u64,
) -> usize {
    let frame = cfg.patch_size * cfg.patch_size;
    let per_channel = cfg.temporal_patch_size * frame;
    let row = 3 * per_channel;
    assert_eq!(
        pixel_values.len() % row,
        0,
        "pixel_values rows are not patches"
    );
    let threshold = patch_mask_threshold(p);
    let mut noise_rng = StdRng::seed_from_u64(seed ^ 0xA5A5_5A5A_C3C3_3C3C);
    let mut count = 0;
    for (k, patch) in pixel_values.chunks_mut(row).enumerate() {
        if !patch_is_blackened(seed, k as u64, threshold) {
            continue;
        }
        count += 1;
        match kind {
            Perturbation::Black | Perturbation::Grey => {
                let values = normalised(
                    cfg,
                    if kind == Perturbation::Black {
                        0.0
                    } else {
                        128.0
                    },
                );
                for (c, channel) in patch.chunks_mut(per_channel).enumerate() {
                    channel.fill(values[c]);
                }
            }
            Perturbation::Blur => {
                for channel in patch.chunks_mut(per_channel) {
                    let mean = channel.iter().sum::<f32>() / channel.len() as f32;
                    channel.fill(mean);
                }
            }
            Perturbation::Noise => {
                // One noise image, the same in every temporal copy (the
                // frames of a still image are identical).
                let pixels: Vec<f32> = (0..frame * 3)
                    .map(|_| noise_rng.random_range(0..=255u8) as f32)
                    .collect();
                for (c, channel) in patch.chunks_mut(per_channel).enumerate() {
                    for copy in channel.chunks_mut(frame) {
                        for (k, v) in copy.iter_mut().enumerate() {
                            *v = normalised(cfg, pixels[c * frame + k])[c];
                        }
                    }
                }
            }
        }
    }
    count
}

/// [`perturb_patches`] over every image of a sequence (`grids` give each
/// image's patch count), image `i` with [`image_mask_seed`]`(seed, i)`.
pub fn perturb_images(
    pixel_values: &mut [f32],
    grids: &[[usize; 3]],
    cfg: &ImageProcessorConfig,
    kind: Perturbation,
    p: f64,
    seed: u64,
) -> usize {
    let row = 3 * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
    let mut at = 0;
    let mut count = 0;
    for (i, g) in grids.iter().enumerate() {
        let rows = g.iter().product::<usize>();
        count += perturb_patches(
            &mut pixel_values[at * row..(at + rows) * row],
            cfg,
            kind,
            p,
            image_mask_seed(seed, i),
        );
        at += rows;
    }
    count
}

/// Where the perturbed pass draws its tiles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PerturbSpace {
    /// Exactly the ViT's 14x14 patches of the resized image (the engine's
    /// design: the GPU's fused dual pass draws the mask in patch-embed).
    #[default]
    Patches,
    /// The reference's: 14x14-pixel tiles of the image before the
    /// processor's resize, which then resamples them across patch borders.
    Pixels,
}

/// The reference's perturbation: `img` cut into `tile`-pixel tiles from the
/// top left (partial tiles at the right and bottom edges), tile `k` in
/// row-major order perturbed when [`patch_is_blackened`]`(seed, k)`.
pub fn perturb_tiles(
    img: &RgbImage,
    tile: usize,
    kind: Perturbation,
    p: f64,
    seed: u64,
) -> RgbImage {
    let mut out = img.clone();
    let threshold = patch_mask_threshold(p);
    let mut noise_rng = StdRng::seed_from_u64(seed ^ 0xA5A5_5A5A_C3C3_3C3C);
    let (cols, rows) = (img.width.div_ceil(tile), img.height.div_ceil(tile));
    for ty in 0..rows {
        for tx in 0..cols {
            if !patch_is_blackened(seed, (ty * cols + tx) as u64, threshold) {
                continue;
            }
            let (xs, ys) = (
                tx * tile..((tx + 1) * tile).min(img.width),
                ty * tile..((ty + 1) * tile).min(img.height),
            );
            let mut mean = [0f64; 3];
            if kind == Perturbation::Blur {
                for y in ys.clone() {
                    for x in xs.clone() {
                        for (c, m) in mean.iter_mut().enumerate() {
                            *m += img.data[(y * img.width + x) * 3 + c] as f64;
                        }
                    }
                }
                let n = (xs.len() * ys.len()) as f64;
                mean = mean.map(|m| (m / n).round());
            }
            for y in ys.clone() {
                for x in xs.clone() {
                    let px = &mut out.data[(y * img.width + x) * 3..][..3];
                    for (c, v) in px.iter_mut().enumerate() {
                        *v = match kind {
                            Perturbation::Black => 0,
                            Perturbation::Grey => 128,
                            Perturbation::Blur => mean[c] as u8,
                            Perturbation::Noise => noise_rng.random_range(0..=255u8),
                        };
                    }
                }
            }
        }
    }
    out
}

/// The perturbed `pixel_values` of a sequence's images in the reference's
/// space: each loaded image's 14-pixel tiles perturbed (image `i` with
/// [`image_mask_seed`]`(seed, i)`), then resized by the processor to the
/// same grid and patchified.
pub fn perturb_loaded_images(
    loaded: &[RgbImage],
    resized: &[RgbImage],
    cfg: &ImageProcessorConfig,
    kind: Perturbation,
    p: f64,
    seed: u64,
) -> Vec<f32> {
    let mut out = Vec::new();
    for (i, (img, target)) in loaded.iter().zip(resized).enumerate() {
        let tiles = perturb_tiles(img, cfg.patch_size, kind, p, image_mask_seed(seed, i));
        out.extend(patchify(&tiles.resize(target.width, target.height), cfg));
    }
    out
}

pub use crate::backend::desc::{image_mask_seed, patch_is_blackened, patch_mask_threshold};

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
        let n = blacken_patches(&mut pv, &cfg, 0.5, 11);
        let dark = pv.chunks(row).filter(|r| r[0] != 0.5).count();
        assert_eq!(n, dark);
        assert!(pv
            .chunks(row)
            .all(|r| r[0] == 0.5 || r[0] == normalised(&cfg, 0.0)[0]));
    }

    #[test]
    fn every_perturbation_hits_the_same_tiles_and_keeps_others() {
        let cfg = ImageProcessorConfig::default();
        let img = RgbImage {
            width: 56,
            height: 56,
            data: (0..56 * 56 * 3).map(|i| (i * 13 % 251) as u8).collect(),
        };
        let clean = patchify(&img, &cfg);
        let row = clean.len() / 16;
        let changed = |pv: &[f32]| -> Vec<bool> {
            pv.chunks(row)
                .zip(clean.chunks(row))
                .map(|(a, b)| a != b)
                .collect()
        };
        let mut black_pv = clean.clone();
        blacken_patches(&mut black_pv, &cfg, 0.5, 9);
        let tiles = changed(&black_pv);
        assert!(tiles.iter().any(|&t| t) && !tiles.iter().all(|&t| t));
        for kind in [Perturbation::Grey, Perturbation::Noise, Perturbation::Blur] {
            let mut pv = clean.clone();
            let n = perturb_patches(&mut pv, &cfg, kind, 0.5, 9);
            assert_eq!(changed(&pv), tiles, "{kind:?}");
            assert_eq!(n, tiles.iter().filter(|&&t| t).count());
            let per_channel = row / 3;
            for (k, patch) in pv.chunks(row).enumerate().filter(|(k, _)| tiles[*k]) {
                for (c, ch) in patch.chunks(per_channel).enumerate() {
                    match kind {
                        Perturbation::Grey => {
                            assert!(ch.iter().all(|&v| v == normalised(&cfg, 128.0)[c]))
                        }
                        Perturbation::Blur => {
                            let orig = &clean[k * row + c * per_channel..][..per_channel];
                            let mean = orig.iter().sum::<f32>() / per_channel as f32;
                            assert!(ch.iter().all(|&v| (v - mean).abs() < 1e-5));
                        }
                        _ => {
                            // Noise: the two temporal copies agree, values vary.
                            let (a, b) = ch.split_at(per_channel / 2);
                            assert_eq!(a, b);
                            assert!(a.iter().any(|&v| v != a[0]));
                        }
                    }
                }
            }
        }
    }

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

    /// A sequence's images each get their own draw: image `i` is masked as
    /// `perturb_patches` with `image_mask_seed(seed, i)` on its own rows
    /// (the device's patch-embed kernel runs per image the same way).
    #[test]
    fn each_image_of_a_sequence_has_its_own_mask() {
        let cfg = ImageProcessorConfig::default();
        let row = 3 * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
        let grids = [[1, 4, 4], [1, 2, 6]];
        let clean: Vec<f32> = (0..28 * row).map(|i| (i % 97) as f32 / 97.0).collect();
        let mut whole = clean.clone();
        let n = perturb_images(&mut whole, &grids, &cfg, Perturbation::Black, 0.5, 9);
        let mut parts = clean.clone();
        let (a, b) = parts.split_at_mut(16 * row);
        let na = perturb_patches(a, &cfg, Perturbation::Black, 0.5, image_mask_seed(9, 0));
        let nb = perturb_patches(b, &cfg, Perturbation::Black, 0.5, image_mask_seed(9, 1));
        assert_eq!(whole, parts);
        assert_eq!(n, na + nb);
        assert!(na > 0 && nb > 0 && n < 28);
        // Not the draw of one image spanning both.
        let mut one = clean;
        perturb_patches(&mut one, &cfg, Perturbation::Black, 0.5, 9);
        assert_ne!(one, whole);
    }

    #[test]
    fn pixel_space_blackens_tiles_before_the_resize() {
        let cfg = ImageProcessorConfig::default();
        // The loaded image (100x70: tiles of 14 leave partial ones at the
        // edges) and the processor's target 112x84.
        let loaded = RgbImage {
            width: 100,
            height: 70,
            data: (0..100 * 70 * 3).map(|i| (i * 7 % 253) as u8).collect(),
        };
        let resized = loaded.resize(112, 84);
        let (p, seed) = (0.5, 21);
        let got = perturb_loaded_images(
            std::slice::from_ref(&loaded),
            std::slice::from_ref(&resized),
            &cfg,
            Perturbation::Black,
            p,
            seed,
        );
        // The host reference: every pixel of a drawn tile set to 0, by
        // pixel position, then the processor's resize and patches.
        let (t, cols) = (patch_mask_threshold(p), 100usize.div_ceil(14));
        let mut black = loaded.clone();
        let mut drawn = 0;
        for y in 0..70 {
            for x in 0..100 {
                if patch_is_blackened(
                    image_mask_seed(seed, 0),
                    ((y / 14) * cols + x / 14) as u64,
                    t,
                ) {
                    black.data[(y * 100 + x) * 3..][..3].fill(0);
                    drawn += 1;
                }
            }
        }
        assert!(drawn > 0 && drawn < 100 * 70);
        assert_eq!(got, patchify(&black.resize(112, 84), &cfg));
        // The tiles drift off the ViT grid: some patches come out partly
        // dark, neither the clean patch nor a black one.
        let clean = patchify(&resized, &cfg);
        let row = clean.len() / 48;
        let dark = normalised(&cfg, 0.0)[0];
        let mixed = got
            .chunks(row)
            .zip(clean.chunks(row))
            .filter(|(g, c)| g != c && g.iter().any(|&v| v != dark))
            .count();
        assert!(mixed > 0);
        // p = 0 leaves the image alone.
        let none =
            perturb_loaded_images(&[loaded], &[resized], &cfg, Perturbation::Black, 0.0, seed);
        assert_eq!(none, clean);
    }
}
