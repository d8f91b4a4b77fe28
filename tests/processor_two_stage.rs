//! The reference's two image resizes (its data loading into the recipe's
//! pixel range, then the processor's smart_resize) against Pillow's
//! results, computed by scripts/fixtures/make_resize_fixture.py.

use std::path::Path;
use vppo_engine::processor::image::{
    dataset_resize, process_image, ImageProcessorConfig, RgbImage,
};

/// The fixture script's test image.
fn pattern(w: usize, h: usize) -> RgbImage {
    let mut data = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) * 3;
            data[i] = ((x * 7 + y * 13) & 255) as u8;
            data[i + 1] = (((x ^ y) * 5) & 255) as u8;
            data[i + 2] = (((x * y) >> 3) & 255) as u8;
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}

#[test]
fn two_stage_resize_matches_pillow_below_inside_and_above_the_range() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize_two_stage/cases.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let pair = |k: &str| {
        let v = fixture[k].as_array().unwrap();
        (
            v[0].as_u64().unwrap() as usize,
            v[1].as_u64().unwrap() as usize,
        )
    };
    let (data_min, data_max) = pair("data_pixels");
    let (proc_min, proc_max) = pair("processor_pixels");
    let cfg = ImageProcessorConfig {
        min_pixels: proc_min,
        max_pixels: proc_max,
        dataset_pixels: Some((data_min, data_max)),
        ..Default::default()
    };
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let n = |k: &str, i: usize| case[k][i].as_u64().unwrap() as usize;
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let img = pattern(w, h);
        let first = dataset_resize(&img, data_min, data_max);
        assert_eq!(
            (first.width, first.height),
            (n("stage1", 0), n("stage1", 1)),
            "{w}x{h}"
        );
        assert_eq!(
            format!("{:016x}", fnv1a64(&first.data)),
            case["stage1_fnv1a64"].as_str().unwrap(),
            "{w}x{h}: the first stage's pixels differ from Pillow's"
        );
        let p = process_image(&img, &cfg, Path::new("test.png")).unwrap();
        assert_eq!(
            (p.resized.width, p.resized.height),
            (n("stage2", 0), n("stage2", 1)),
            "{w}x{h}"
        );
        assert_eq!(
            format!("{:016x}", fnv1a64(&p.resized.data)),
            case["fnv1a64"].as_str().unwrap(),
            "{w}x{h}: the pixels differ from Pillow's"
        );
        if (w, h) == (2000, 2000) {
            // The example: 1008x1008, 1,296 image tokens (one
            // stage with the recipe's bounds gives 980x980, 1,225).
            assert_eq!(p.num_tokens(2), 1296);
            let one_stage = ImageProcessorConfig {
                min_pixels: data_min,
                max_pixels: data_max,
                ..Default::default()
            };
            let q = process_image(&img, &one_stage, Path::new("test.png")).unwrap();
            assert_eq!((q.resized.width, q.num_tokens(2)), (980, 1225));
        }
    }
}
