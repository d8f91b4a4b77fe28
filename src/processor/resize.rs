//! Pillow's BICUBIC resize of 8-bit RGB images, reproduced exactly: the
//! transformers image processor resizes with Pillow, and small random test
//! models are sensitive to single-level differences.
//!
//! Pillow resamples horizontally first into an 8-bit image, then vertically;
//! each output sample is a fixed-point (22 fractional bits) weighted sum of
//! the source samples, rounded and clipped to 0..=255. When shrinking, the
//! kernel is stretched by the scale factor (antialiasing).

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Keys' cubic with a = -0.5 (Pillow's BICUBIC), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point taps of every output sample along one axis.
struct Taps {
    /// (first source index, number of taps) per output sample.
    bounds: Vec<(usize, usize)>,
    /// `ksize` coefficients per output sample.
    coeffs: Vec<i32>,
    ksize: usize,
}

fn precompute_taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut coeffs = vec![0i32; out_size * ksize];
    let mut weights = vec![0.0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; negative starts clamp to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let mut total = 0.0;
        for (x, w) in weights.iter_mut().enumerate().take(count) {
            *w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *w;
        }
        let row = &mut coeffs[xx * ksize..(xx + 1) * ksize];
        for x in 0..count {
            let k = if total != 0.0 {
                weights[x] / total
            } else {
                weights[x]
            };
            let scaled = k * (1u32 << PRECISION_BITS) as f64;
            row[x] = if k < 0.0 {
                (scaled - 0.5) as i32
            } else {
                (scaled + 0.5) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Taps {
        bounds,
        coeffs,
        ksize,
    }
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resamples interleaved `channels`-sample pixels along one axis: `stride`
/// is the distance between neighbours along that axis, `lines` and
/// `line_stride` walk the other axis.
#[allow(clippy::too_many_arguments)]
fn resample_axis(
    src: &[u8],
    dst: &mut [u8],
    taps: &Taps,
    lines: usize,
    src_line_stride: usize,
    src_stride: usize,
    dst_line_stride: usize,
    dst_stride: usize,
    channels: usize,
) {
    let round = 1i64 << (PRECISION_BITS - 1);
    for line in 0..lines {
        for (out, &(start, count)) in taps.bounds.iter().enumerate() {
            let k = &taps.coeffs[out * taps.ksize..out * taps.ksize + count];
            for c in 0..channels {
                let mut acc = round;
                for (i, &kv) in k.iter().enumerate() {
                    let s = src[line * src_line_stride + (start + i) * src_stride + c];
                    acc += s as i64 * kv as i64;
                }
                dst[line * dst_line_stride + out * dst_stride + c] = clip8(acc);
            }
        }
    }
}

/// Resizes an interleaved 8-bit image (`channels` samples per pixel) to
/// `out_w x out_h` as `PIL.Image.resize(size, Image.BICUBIC)` does.
pub fn resize_bicubic(
    src: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    assert_eq!(src.len(), width * height * channels, "resize: buffer size");
    if (out_w, out_h) == (width, height) {
        return src.to_vec();
    }
    // Horizontal pass (only when the width changes), into an 8-bit image.
    let horizontal;
    let (mid, mid_w) = if out_w != width {
        let taps = precompute_taps(width, out_w);
        let mut out = vec![0u8; out_w * height * channels];
        resample_axis(
            src,
            &mut out,
            &taps,
            height,
            width * channels,
            channels,
            out_w * channels,
            channels,
            channels,
        );
        horizontal = out;
        (&horizontal[..], out_w)
    } else {
        (src, width)
    };
    if out_h == height {
        return mid.to_vec();
    }
    let taps = precompute_taps(height, out_h);
    let mut out = vec![0u8; mid_w * out_h * channels];
    // Vertical: lines are columns (stepping one pixel), neighbours a row apart.
    resample_axis(
        mid,
        &mut out,
        &taps,
        mid_w,
        channels,
        mid_w * channels,
        channels,
        mid_w * channels,
        channels,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy_and_constant_images_stay_constant() {
        let img: Vec<u8> = (0..5 * 4 * 3).map(|v| v as u8).collect();
        assert_eq!(resize_bicubic(&img, 5, 4, 3, 5, 4), img);
        let flat = vec![77u8; 9 * 7 * 3];
        for (w, h) in [(4, 3), (13, 11), (9, 2), (1, 1)] {
            let out = resize_bicubic(&flat, 9, 7, 3, w, h);
            assert!(out.iter().all(|&v| v == 77), "{w}x{h}");
        }
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (i, o) in [(10, 3), (3, 10), (100, 37), (28, 56)] {
            let t = precompute_taps(i, o);
            for (out, &(_, count)) in t.bounds.iter().enumerate() {
                let s: i64 = t.coeffs[out * t.ksize..out * t.ksize + count]
                    .iter()
                    .map(|&c| c as i64)
                    .sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= count as i64,
                    "{i}->{o} sample {out}: {s}"
                );
            }
        }
    }

    #[test]
    fn ramps_stay_monotone_when_shrunk_or_enlarged() {
        // Pillow parity itself is tested on the transformers fixtures
        // (tests/processor_parity.rs); this checks the axis bookkeeping.
        let ramp = [0u8, 50, 100, 150, 200, 250];
        let down = resize_bicubic(&ramp, 6, 1, 1, 4, 1);
        let up = resize_bicubic(&ramp, 6, 1, 1, 9, 1);
        assert_eq!(down.len(), 4);
        assert_eq!(up.len(), 9);
        assert!(down.windows(2).all(|w| w[0] <= w[1]));
        assert!(up.windows(2).all(|w| w[0] <= w[1]));
    }
}
