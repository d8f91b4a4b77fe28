//! The image processor against transformers' (PIL backend) output on the
//! committed fixtures: grids equal, pixel values bit-for-bit.

mod common;

use common::fixtures::{case_dir, inputs, max_abs_diff, Reference, CASES};
use vppo_engine::processor::image::{process_image, smart_resize, ImageProcessorConfig, RgbImage};

#[test]
fn pixel_values_and_grids_match_transformers() {
    for case in CASES {
        let dir = case_dir(case);
        let cfg = ImageProcessorConfig::load(&dir).unwrap();
        let reference = Reference::open(case, "reference.safetensors");
        let (_, want_pixels) = reference.f32("pixel_values");
        let (_, want_grid) = reference.i64("image_grid_thw");
        let mut pixels = Vec::new();
        let mut grids = Vec::new();
        for name in inputs(case)["images"].as_array().unwrap() {
            let path = dir.join(name.as_str().unwrap());
            let img = RgbImage::open(&path).unwrap();
            let p = process_image(&img, &cfg, &path).unwrap();
            pixels.extend(p.pixel_values);
            grids.extend(p.grid_thw.iter().map(|&g| g as i64));
        }
        assert_eq!(grids, want_grid, "{case}: grid_thw");
        let diff = max_abs_diff(&pixels, &want_pixels);
        assert_eq!(diff, 0.0, "{case}: pixel values differ by up to {diff}");
    }
}

#[test]
fn smart_resize_follows_the_reference_rules() {
    let cfg = ImageProcessorConfig::default();
    // Example of the spec: 1024x768 (w x h) -> 1036x756, 999 tokens.
    assert_eq!(smart_resize(768, 1024, &cfg), Some((756, 1036)));
    // Python rounds half to even: 126 / 28 = 4.5 -> 4.
    let small = ImageProcessorConfig {
        min_pixels: 6272,
        max_pixels: 15680,
        ..cfg.clone()
    };
    assert_eq!(smart_resize(150, 126, &small), Some((140, 112)));
    // Too large: scaled down; too small: scaled up.
    assert_eq!(smart_resize(200, 300, &small), Some((84, 140)));
    assert_eq!(smart_resize(60, 50, &small), Some((112, 84)));
    // Aspect ratio above 200 is refused.
    assert_eq!(smart_resize(1, 201, &cfg), None);
}

#[test]
fn unreadable_images_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("vppo-img-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("not-an-image.png");
    std::fs::write(&bad, b"this is text").unwrap();
    let err = RgbImage::open(&bad).unwrap_err().to_string();
    assert!(
        err.contains("not-an-image.png") && err.contains("cannot decode"),
        "{err}"
    );
    let missing = dir.join("missing.png");
    let err = RgbImage::open(&missing).unwrap_err().to_string();
    assert!(
        err.contains("missing.png") && err.contains("cannot read"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
