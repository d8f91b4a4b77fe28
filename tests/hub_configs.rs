//! Shape-only checks with the released Qwen2.5-VL-3B, -7B and -32B
//! config.json files as published on the Hub and shipped under
//! `configs/models/`: they parse, and the parameter table has the published
//! parameter counts.

use std::path::Path;
use vppo_engine::model::config::ModelConfig;
use vppo_engine::model::params::ParamLayout;

fn shipped(name: &str) -> ModelConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/models")
        .join(name);
    ModelConfig::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn released_configs_give_the_published_parameter_counts() {
    // Qwen2.5-VL-7B-Instruct: 8,292,166,656 parameters (model card / safetensors index).
    let c7 = shipped("qwen2.5-vl-7b");
    assert_eq!(c7.text.head_dim, 128);
    assert_eq!(c7.vision.patch_dim(), 1176);
    assert_eq!(ParamLayout::new(&c7).numel(), 8_292_166_656);
    // Qwen2.5-VL-3B-Instruct: tied head, 3,754,622,976 parameters.
    let c3 = shipped("qwen2.5-vl-3b");
    let l3 = ParamLayout::new(&c3);
    assert!(l3.text.lm_head.is_none());
    assert_eq!(l3.numel(), 3_754_622_976);
    // Qwen2.5-VL-32B-Instruct: 33,452,718,336 parameters (the model card's
    // 33.5B; transformers 5.24 counts the same from this file).
    let c32 = shipped("qwen2.5-vl-32b");
    assert_eq!(ParamLayout::new(&c32).numel(), 33_452_718_336);
}

/// The published 32B config leaves most of `vision_config` out; the loader
/// fills it with transformers' defaults, as transformers does.
#[test]
fn the_32b_vision_tower_takes_the_transformers_defaults() {
    let v = shipped("qwen2.5-vl-32b").vision;
    assert_eq!((v.depth, v.num_heads, v.hidden_size), (32, 16, 1280));
    assert_eq!(v.intermediate_size, 3456, "the 32B's own MLP width");
    assert_eq!(v.fullatt_block_indexes, vec![7, 15, 23, 31]);
    assert_eq!(
        (v.window_size, v.patch_size, v.spatial_merge_size),
        (112, 14, 2)
    );
    assert_eq!(v.out_hidden_size, 5120);
    // The 3B and 7B spell the same tower out in full.
    for name in ["qwen2.5-vl-3b", "qwen2.5-vl-7b"] {
        let v = shipped(name).vision;
        assert_eq!((v.depth, v.intermediate_size), (32, 3420), "{name}");
        assert_eq!(v.fullatt_block_indexes, vec![7, 15, 23, 31], "{name}");
    }
}
