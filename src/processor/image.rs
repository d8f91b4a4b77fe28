//! The Qwen2-VL image processor: decode, RGB, smart_resize, Pillow-exact
//! bicubic resize, rescale + CLIP normalisation, and patchify in the order
//! the vision tower expects.

use super::resize::resize_bicubic;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode image {path}: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("image {path} is {width}x{height}: aspect ratio above 200 is not supported")]
    AspectRatio {
        path: PathBuf,
        width: usize,
        height: usize,
    },
    #[error("image {path} is empty (0 pixels)")]
    Empty { path: PathBuf },
    #[error("{path}: invalid preprocessor config: {reason}")]
    Config { path: PathBuf, reason: String },
}

/// Settings of `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    /// The reference's data-loading stage before the processor's own
    /// resize: `(min_pixels, max_pixels)` of the recipe (see
    /// [`dataset_resize`]). `None`: the processor's resize alone.
    pub dataset_pixels: Option<(usize, usize)>,
}

impl Default for ImageProcessorConfig {
    // CLIP's mean/std as published (and as numpy rounds them to f32).
    #[allow(clippy::excessive_precision)]
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            merge_size: 2,
            temporal_patch_size: 2,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
            rescale_factor: 1.0 / 255.0,
            dataset_pixels: None,
        }
    }
}

impl ImageProcessorConfig {
    /// What the patch-embed kernel needs of this processor.
    pub fn geometry(&self) -> crate::backend::desc::PatchGeometry {
        crate::backend::desc::PatchGeometry {
            patch: self.patch_size,
            merge: self.merge_size,
            temporal: self.temporal_patch_size,
        }
    }

    /// Reads `preprocessor_config.json` from a checkpoint directory; the
    /// defaults apply when the file is absent.
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let bad = |reason: String| ImageError::Config {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ImageError::Read {
            path: path.clone(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let mut cfg = Self::default();
        let uint = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64).map(|x| x as usize);
        // Older files: min_pixels / max_pixels; newer: size.{shortest,longest}_edge.
        if let Some(size) = json.get("size") {
            cfg.min_pixels = uint(size, "shortest_edge").unwrap_or(cfg.min_pixels);
            cfg.max_pixels = uint(size, "longest_edge").unwrap_or(cfg.max_pixels);
        }
        cfg.min_pixels = uint(&json, "min_pixels").unwrap_or(cfg.min_pixels);
        cfg.max_pixels = uint(&json, "max_pixels").unwrap_or(cfg.max_pixels);
        cfg.patch_size = uint(&json, "patch_size").unwrap_or(cfg.patch_size);
        cfg.merge_size = uint(&json, "merge_size").unwrap_or(cfg.merge_size);
        cfg.temporal_patch_size =
            uint(&json, "temporal_patch_size").unwrap_or(cfg.temporal_patch_size);
        let triple = |key: &str, into: &mut [f32; 3]| -> Result<(), ImageError> {
            if let Some(v) = json.get(key) {
                let vals: Vec<f32> = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_f64)
                            .map(|x| x as f32)
                            .collect()
                    })
                    .unwrap_or_default();
                *into = vals
                    .try_into()
                    .map_err(|_| bad(format!("`{key}` must be a list of 3 numbers")))?;
            }
            Ok(())
        };
        triple("image_mean", &mut cfg.image_mean)?;
        triple("image_std", &mut cfg.image_std)?;
        if let Some(r) = json.get("rescale_factor").and_then(Value::as_f64) {
            cfg.rescale_factor = r;
        }
        if cfg.patch_size == 0 || cfg.merge_size == 0 || cfg.temporal_patch_size == 0 {
            return Err(bad(
                "patch_size, merge_size and temporal_patch_size must be positive".into(),
            ));
        }
        if cfg.min_pixels > cfg.max_pixels {
            return Err(bad(format!(
                "min_pixels {} exceeds max_pixels {}",
                cfg.min_pixels, cfg.max_pixels
            )));
        }
        Ok(cfg)
    }

    /// Resize granularity: one merged token covers `factor x factor` pixels.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// Whether `bytes` are a JPEG whose last scan has no end-of-image marker
/// after it. Inside entropy-coded data a 0xFF byte is always followed by 0x00
/// or a restart marker, so an `FF D9` after the last start-of-scan (`FF DA`)
/// is the real end marker.
pub fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let find_last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    match (find_last(0xDA), find_last(0xD9)) {
        (Some(scan), Some(end)) => end < scan,
        // No scan at all: cut off before the image data.
        (Some(_), None) | (None, _) => true,
    }
}

/// A decoded RGB image, 8 bits per sample, row-major interleaved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Decodes PNG or JPEG bytes; `source` names the image in errors.
    pub fn decode(bytes: &[u8], source: &Path) -> Result<Self, ImageError> {
        if jpeg_is_truncated(bytes) {
            // The JPEG decoder fills a cut-off scan with grey and succeeds;
            // Pillow refuses such a file, and so do we.
            return Err(ImageError::Decode {
                path: source.to_path_buf(),
                reason: "image file is truncated (the JPEG data ends before its end marker)".into(),
            });
        }
        let img = image::load_from_memory(bytes).map_err(|e| ImageError::Decode {
            path: source.to_path_buf(),
            reason: e.to_string(),
        })?;
        let (width, height) = (img.width() as usize, img.height() as usize);
        if width == 0 || height == 0 {
            return Err(ImageError::Empty {
                path: source.to_path_buf(),
            });
        }
        let data = if img.color().has_alpha() {
            // transformers' convert_rgb composites transparent pixels on white.
            let rgba = img.to_rgba8();
            rgba.pixels()
                .flat_map(|p| {
                    let a = p[3] as u32;
                    let blend = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
                    [blend(p[0]), blend(p[1]), blend(p[2])]
                })
                .collect()
        } else {
            img.to_rgb8().into_raw()
        };
        Ok(Self {
            width,
            height,
            data,
        })
    }

    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::decode(&bytes, path)
    }

    pub fn resize(&self, width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: resize_bicubic(&self.data, self.width, self.height, 3, width, height),
        }
    }
}

/// Python's `round` (half to even) as used by `smart_resize`.
fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// The target `(height, width)`: multiples of `factor`, area within
/// `[min_pixels, max_pixels]`, aspect ratio kept as far as possible.
pub fn smart_resize(
    height: usize,
    width: usize,
    cfg: &ImageProcessorConfig,
) -> Option<(usize, usize)> {
    let f = cfg.factor() as f64;
    let (h, w) = (height as f64, width as f64);
    if height == 0 || width == 0 || h.max(w) / h.min(w) > 200.0 {
        return None;
    }
    let mut h_bar = round_half_even(h / f) * f;
    let mut w_bar = round_half_even(w / f) * f;
    if h_bar * w_bar > cfg.max_pixels as f64 {
        let beta = (h * w / cfg.max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < cfg.min_pixels as f64 {
        let beta = (cfg.min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Some((h_bar as usize, w_bar as usize))
}

/// The reference's `process_image` in its data set (EasyR1's
/// `dataset.py`): an image over `max_pixels` is scaled down, one under
/// `min_pixels` up, keeping the aspect ratio, each side
/// `int(side * sqrt(bound / area))` (truncated, so the area can land just
/// outside the bound), with Pillow's bicubic. The processor's
/// `smart_resize` then resizes the result a second time.
pub fn dataset_resize(img: &RgbImage, min_pixels: usize, max_pixels: usize) -> RgbImage {
    let mut img = img.clone();
    // Both checks in turn, as the reference: the second sees the first's
    // result.
    for (bound, over) in [(max_pixels, true), (min_pixels, false)] {
        let area = img.width * img.height;
        if (over && area > bound) || (!over && area < bound) {
            let factor = (bound as f64 / area as f64).sqrt();
            let w = (img.width as f64 * factor) as usize;
            let h = (img.height as f64 * factor) as usize;
            if w > 0 && h > 0 {
                img = img.resize(w, h);
            }
        }
    }
    img
}

/// One image ready for the vision tower.
#[derive(Debug, Clone)]
pub struct ProcessedImage {
    /// `[grid_t * grid_h * grid_w, C * T * P * P]`.
    pub pixel_values: Vec<f32>,
    /// `(grid_t, grid_h, grid_w)` in patches.
    pub grid_thw: [usize; 3],
    /// The image after smart_resize (the VPPO perturbation works on it).
    pub resized: RgbImage,
    /// The image the processor's resize started from (after the data
    /// loading's stage, when there is one).
    pub loaded: RgbImage,
}

impl ProcessedImage {
    /// LLM tokens this image becomes (`<|image_pad|>` count).
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.grid_thw.iter().product::<usize>() / (merge_size * merge_size)
    }
}

/// Resizes, normalises and patchifies one image.
pub fn process_image(
    img: &RgbImage,
    cfg: &ImageProcessorConfig,
    source: &Path,
) -> Result<ProcessedImage, ImageError> {
    let staged;
    let img = match cfg.dataset_pixels {
        Some((min, max)) => {
            staged = dataset_resize(img, min, max);
            &staged
        }
        None => img,
    };
    let (h, w) =
        smart_resize(img.height, img.width, cfg).ok_or_else(|| ImageError::AspectRatio {
            path: source.to_path_buf(),
            width: img.width,
            height: img.height,
        })?;
    let resized = img.resize(w, h);
    let pixel_values = patchify(&resized, cfg);
    let p = cfg.patch_size;
    Ok(ProcessedImage {
        pixel_values,
        grid_thw: [1, h / p, w / p],
        resized,
        loaded: img.clone(),
    })
}

/// Normalises and lays out the patches of an already resized image:
/// rows ordered (merged row, merged col, inner row, inner col), features
/// `((c * T + t) * P + y) * P + x`; the single frame is repeated over T.
/// The normalised value of every channel byte: transformers' u8 -> f64 *
/// scale -> f32, then (x - mean) / std in f32. The GPU patch-embed kernel
/// (`kernels/patch_embed.cu`) reads this same table.
pub fn normalize_lut(cfg: &ImageProcessorConfig) -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, out) in table.iter_mut().enumerate() {
            let x = (v as f64 * cfg.rescale_factor) as f32;
            *out = (x - cfg.image_mean[c]) / cfg.image_std[c];
        }
    }
    lut
}

/// The vision tower's `pixel_values` of a resized image (the CPU twin of
/// the GPU patch-embed kernel: `backend::cpu::patch_embed`).
pub fn patchify(img: &RgbImage, cfg: &ImageProcessorConfig) -> Vec<f32> {
    let lut = normalize_lut(cfg);
    crate::backend::cpu::patch_embed::patch_embed(
        &cfg.geometry(),
        &lut,
        &img.data,
        img.width,
        img.height,
        None,
    )
    .0
}
