#![recursion_limit = "256"]
//! Shape-only checks with the released Qwen2.5-VL-3B and -7B config.json
//! files (as published on the Hub): the configs parse and the parameter
//! table has the published parameter counts.

use std::path::Path;
use vppo_engine::model::config::ModelConfig;
use vppo_engine::model::params::ParamLayout;

fn hub_config(
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    vocab: usize,
    tied: bool,
) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
        "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
        "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": inter,
        "max_position_embeddings": 128000, "max_window_layers": 70, "model_type": "qwen2_5_vl",
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
        "use_cache": true, "use_sliding_window": false,
        "vision_config": {
            "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
            "num_heads": 16, "in_chans": 3, "out_hidden_size": hidden, "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": vocab
    })
}

#[test]
fn released_configs_give_the_published_parameter_counts() {
    let path = Path::new("config.json");
    // Qwen2.5-VL-7B-Instruct: 8,292,166,656 parameters (model card / safetensors index).
    let c7 =
        ModelConfig::from_json(&hub_config(3584, 18944, 28, 28, 4, 152064, false), path).unwrap();
    assert_eq!(c7.text.head_dim, 128);
    assert_eq!(c7.vision.patch_dim(), 1176);
    assert_eq!(ParamLayout::new(&c7).numel(), 8_292_166_656);
    // Qwen2.5-VL-3B-Instruct: tied head, 3,754,622,976 parameters.
    let c3 =
        ModelConfig::from_json(&hub_config(2048, 11008, 36, 16, 2, 151936, true), path).unwrap();
    let l3 = ParamLayout::new(&c3);
    assert!(l3.text.lm_head.is_none());
    assert_eq!(l3.numel(), 3_754_622_976);
}
