//! The patch-embed kernel (normalise + patchify, plus the hashed blackening
//! mask) against `processor::image::patchify` and
//! `rl::perturb::blacken_patches`: bit-identical.

use crate::{cuda, drv, Case};
use half::bf16;
use rand::Rng;
use vppo_engine::backend::cpu::cast::f32_to_bf16;
use vppo_engine::backend::cuda::PatchMask;
use vppo_engine::processor::image::{normalize_lut, patchify, ImageProcessorConfig, RgbImage};
use vppo_engine::rl::perturb::blacken_patches;

pub fn patch_embed_case(width: usize, height: usize, p: f64, seed: u64) -> Case {
    Case {
        name: format!("patch_embed {width}x{height} mask p={p} seed={seed}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let cfg = ImageProcessorConfig::default();
            let img = RgbImage {
                width,
                height,
                data: (0..width * height * 3)
                    .map(|_| rng.random::<u8>())
                    .collect(),
            };
            let want = patchify(&img, &cfg);
            let mut want_m = want.clone();
            let dark = blacken_patches(&mut want_m, &cfg, p, seed);
            let lut = gpu.patch_lut(&normalize_lut(&cfg)).map_err(cuda)?;
            let img_d = s.clone_htod(&img.data).map_err(drv)?;
            let mut out = s.clone_htod(&vec![f32::NAN; want.len()]).map_err(drv)?;
            let mut out_m = s.clone_htod(&vec![f32::NAN; want.len()]).map_err(drv)?;
            gpu.patch_embed(
                &cfg.geometry(),
                &lut,
                &img_d.slice(..),
                width,
                height,
                &mut out.slice_mut(..),
                Some(PatchMask {
                    out: &mut out_m.slice_mut(..),
                    seed,
                    p,
                }),
            )
            .map_err(cuda)?;
            let mut plain = s.clone_htod(&vec![f32::NAN; want.len()]).map_err(drv)?;
            gpu.patch_embed(
                &cfg.geometry(),
                &lut,
                &img_d.slice(..),
                width,
                height,
                &mut plain.slice_mut(..),
                None,
            )
            .map_err(cuda)?;
            let same = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .position(|(x, y)| x.to_bits() != y.to_bits())
            };
            for (what, d, r) in [
                ("pixel_values", &out, &want),
                ("masked", &out_m, &want_m),
                ("unmasked call", &plain, &want),
            ] {
                let got = s.clone_dtoh(d).map_err(drv)?;
                if let Some(i) = same(&got, r) {
                    return Err(format!("{what}[{i}]: gpu {} cpu {}", got[i], r[i]));
                }
            }
            Ok(format!(
                "bit-exact; {dark} of {} patches blackened",
                want.len() / (3 * 2 * 14 * 14)
            ))
        }),
    }
}

/// The bf16 GEMM operand: the f32 values rounded (half's rounding), plain
/// and masked, bit-exact.
pub fn patch_embed_bf16_case(width: usize, height: usize, p: f64, seed: u64) -> Case {
    Case {
        name: format!("patch_embed bf16 {width}x{height} mask p={p} seed={seed}"),
        run: Box::new(move |gpu, rng| {
            let s = gpu.stream();
            let cfg = ImageProcessorConfig::default();
            let img = RgbImage {
                width,
                height,
                data: (0..width * height * 3)
                    .map(|_| rng.random::<u8>())
                    .collect(),
            };
            let plain = patchify(&img, &cfg);
            let mut masked = plain.clone();
            blacken_patches(&mut masked, &cfg, p, seed);
            let round = |v: &[f32]| -> Vec<bf16> {
                let mut out = vec![bf16::ZERO; v.len()];
                f32_to_bf16(v, &mut out);
                out
            };
            let (want, want_m) = (round(&plain), round(&masked));
            let lut = gpu.patch_lut(&normalize_lut(&cfg)).map_err(cuda)?;
            let img_d = s.clone_htod(&img.data).map_err(drv)?;
            let mut out = s.clone_htod(&vec![bf16::NAN; want.len()]).map_err(drv)?;
            let mut out_m = s.clone_htod(&vec![bf16::NAN; want.len()]).map_err(drv)?;
            gpu.patch_embed(
                &cfg.geometry(),
                &lut,
                &img_d.slice(..),
                width,
                height,
                &mut out.slice_mut(..),
                Some(PatchMask {
                    out: &mut out_m.slice_mut(..),
                    seed,
                    p,
                }),
            )
            .map_err(cuda)?;
            for (what, d, r) in [("pixel_values", &out, &want), ("masked", &out_m, &want_m)] {
                let got = s.clone_dtoh(d).map_err(drv)?;
                if let Some(i) = got
                    .iter()
                    .zip(r)
                    .position(|(x, y)| x.to_bits() != y.to_bits())
                {
                    return Err(format!("{what}[{i}]: gpu {} cpu {}", got[i], r[i]));
                }
            }
            Ok("bit-exact".into())
        }),
    }
}

pub fn cases() -> Vec<Case> {
    vec![
        patch_embed_case(28, 28, 0.5, 1),
        patch_embed_case(56, 28, 0.0, 2),
        patch_embed_case(28 * 17, 28 * 9, 0.3, 3),
        patch_embed_case(28 * 36, 28 * 36, 1.0, 4),
        patch_embed_bf16_case(28 * 5, 28 * 3, 0.5, 5),
    ]
}
