//! Generation with the paged KV cache against transformers (greedy ids on
//! the fixtures) and against our own scoring (sampled tokens' log-probs);
//! prefill reuse, reproducibility, stopping.

mod common;

use common::fixtures::{case_dir, fixture_input, Reference, CASES};
use vppo_engine::model::acts::Save;
use vppo_engine::model::engine::Engine;
use vppo_engine::model::{Qwen25Vl, SequenceInput, TrainSequence};
use vppo_engine::ops::cpu::CpuBackend;
use vppo_engine::rollout::generate::{eos_ids, FinishReason, Generator};
use vppo_engine::rollout::sampling::SamplingParams;

fn prompt_of(case: &str) -> SequenceInput {
    let (mut input, prompt_len) = fixture_input(case);
    input.ids.truncate(prompt_len);
    input
}

const GREEDY: SamplingParams = SamplingParams {
    temperature: 0.0,
    top_p: 1.0,
    top_k: 0,
};

#[test]
fn greedy_decoding_reproduces_transformers_generate() {
    for case in CASES {
        let model = Qwen25Vl::load(&case_dir(case)).unwrap();
        let want: Vec<u32> = Reference::open(case, "reference.safetensors")
            .i64("greedy_ids")
            .1
            .iter()
            .map(|&v| v as u32)
            .collect();
        let engine_generator = Engine::new(CpuBackend, &model).unwrap();
        let mut generator = Generator::new(&engine_generator, eos_ids(&case_dir(case)));
        let out = generator
            .generate(&[prompt_of(case)], 1, &GREEDY, want.len(), 0)
            .unwrap();
        assert_eq!(out[0].token_ids, want, "{case}: greedy ids");
    }
}

#[test]
fn sampled_log_probs_equal_scoring_the_same_tokens() {
    let case = "two_images";
    let model = Qwen25Vl::load(&case_dir(case)).unwrap();
    let prompt = prompt_of(case);
    let engine_generator = Engine::new(CpuBackend, &model).unwrap();
    let mut generator = Generator::new(&engine_generator, eos_ids(&case_dir(case)));
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        top_k: 50,
    };
    let samples = generator
        .generate(std::slice::from_ref(&prompt), 3, &params, 12, 7)
        .unwrap();
    assert_eq!(samples.len(), 3);
    assert!(
        samples[0].token_ids != samples[1].token_ids
            || samples[1].token_ids != samples[2].token_ids
    );
    for s in &samples {
        let mut input = prompt.clone();
        input.ids.extend(&s.token_ids);
        let batch = [TrainSequence {
            input,
            prompt_len: prompt.ids.len(),
        }];
        let scored = model.train_forward(&batch, Save::Nothing).unwrap();
        let d = s
            .logprobs
            .iter()
            .zip(&scored.logprobs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            d < 1e-4,
            "sample {}: generate vs score log-probs differ by {d}",
            s.sample_index
        );
    }
}

#[test]
fn samples_share_one_prefill_and_are_reproducible() {
    let model = Qwen25Vl::load(&case_dir("resize")).unwrap();
    let prompts = [prompt_of("resize"), prompt_of("resize")];
    let params = SamplingParams::default();
    let engine_generator = Engine::new(CpuBackend, &model).unwrap();
    let mut generator = Generator::new(&engine_generator, vec![]);
    let out = generator.generate(&prompts, 4, &params, 6, 42).unwrap();
    assert_eq!(out.len(), 8);
    // Two prompts: two prefills and their three images each, for 8 samples.
    assert_eq!(generator.stats.prefills, 2);
    assert_eq!(generator.stats.images_encoded, 6);
    assert_eq!(generator.stats.prefill_tokens, 2 * prompts[0].ids.len());
    assert_eq!(
        generator.cache_blocks_in_use(),
        0,
        "finished samples must free their cache blocks"
    );
    assert!(out
        .iter()
        .all(|s| s.token_ids.len() == 6 && s.finish_reason == FinishReason::Length));
    // Sample (p, s) depends only on (seed, p, s): alone or batched, same tokens.
    let engine_alone = Engine::new(CpuBackend, &model).unwrap();
    let mut alone = Generator::new(&engine_alone, vec![]);
    let single = alone.generate(&prompts[..1], 4, &params, 6, 42).unwrap();
    for (a, b) in single.iter().zip(&out[..4]) {
        assert_eq!(a.token_ids, b.token_ids);
    }
    // Same prompt, different prompt index: a different stream.
    assert_ne!(
        out[..4].iter().map(|s| &s.token_ids).collect::<Vec<_>>(),
        out[4..].iter().map(|s| &s.token_ids).collect::<Vec<_>>()
    );
}

#[test]
fn an_end_of_sequence_token_stops_the_sample() {
    let case = "single_noresize";
    let model = Qwen25Vl::load(&case_dir(case)).unwrap();
    let greedy: Vec<u32> = Reference::open(case, "reference.safetensors")
        .i64("greedy_ids")
        .1
        .iter()
        .map(|&v| v as u32)
        .collect();
    // Declare the third greedy token an end-of-sequence id.
    let engine_generator = Engine::new(CpuBackend, &model).unwrap();
    let mut generator = Generator::new(&engine_generator, vec![greedy[2]]);
    let out = generator
        .generate(&[prompt_of(case)], 1, &GREEDY, 50, 0)
        .unwrap();
    assert_eq!(out[0].finish_reason, FinishReason::Stop);
    assert_eq!(out[0].token_ids, greedy[..3]);
    // The fixtures' generation_config.json names <|im_end|> (and <|endoftext|>).
    let eos = eos_ids(&case_dir(case));
    assert!(eos.contains(&362), "{eos:?}");
}

#[test]
fn cli_prints_one_json_line_per_sample_in_batch_mode() {
    let case = "single_noresize";
    let dir = case_dir(case);
    let file = std::env::temp_dir().join(format!("vppo-gen-prompts-{}.jsonl", std::process::id()));
    let img = dir.join("img0.png");
    std::fs::write(
        &file,
        format!(
            "{}\n{}\n",
            serde_json::json!({"prompt": "<image>What is shown?", "images": [img]}),
            serde_json::json!({"prompt": "Count to three."})
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompts",
            file.to_str().unwrap(),
        ])
        .args([
            "--n",
            "2",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
        ])
        .output()
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["prompt_index"], i / 2);
        assert_eq!(l["sample_index"], i % 2);
        let ids = l["token_ids"].as_array().unwrap();
        assert_eq!(ids.len(), l["logprobs"].as_array().unwrap().len());
        assert!(l["text"].is_string());
        let reason = l["finish_reason"].as_str().unwrap();
        assert!(
            reason == "length" && ids.len() == 5 || reason == "stop",
            "{l}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 prefill(s)"), "{stderr}");
    // A bad prompt file is a clear error naming the line.
    let bad = std::env::temp_dir().join(format!("vppo-gen-bad-{}.jsonl", std::process::id()));
    std::fs::write(&bad, "{\"prompt\": \"ok\"}\n{\"images\": []}\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .args([
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompts",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    std::fs::remove_file(&bad).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("line 2") && stderr.contains("prompt"),
        "{stderr}"
    );
}

/// `generate --device cuda`: where a device is usable, the greedy samples
/// are the CPU's (token ids); elsewhere a clear error naming the flag.
#[test]
fn cli_generate_on_cuda_matches_cpu_or_says_why() {
    let dir = case_dir("single_noresize");
    let run = |device: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
            .args(["generate", "--model", dir.to_str().unwrap()])
            .args(["--image", dir.join("img0.png").to_str().unwrap()])
            .args(["--prompt", "<image>What is shown?", "--n", "2"])
            .args(["--temperature", "0", "--max-new-tokens", "6"])
            .args(["--device", device])
            .output()
            .unwrap()
    };
    let ids = |out: &std::process::Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["token_ids"].clone())
            .collect()
    };
    let cpu = run("cpu");
    assert!(cpu.status.success());
    let gpu = run("cuda");
    if gpu.status.success() {
        assert_eq!(ids(&gpu), ids(&cpu));
    } else {
        let stderr = String::from_utf8_lossy(&gpu.stderr);
        assert!(stderr.contains("--device cuda"), "{stderr}");
    }
}

#[test]
fn cli_generates_in_bf16_on_the_cpu_twin_close_to_fp32() {
    let dir = case_dir("single_noresize");
    let file = std::env::temp_dir().join(format!("vppo-gen-bf16-{}.jsonl", std::process::id()));
    std::fs::write(
        &file,
        format!("{}\n", serde_json::json!({"prompt": "Count to three."})),
    )
    .unwrap();
    let first_logprob = |precision: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
            .args([
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompts",
                file.to_str().unwrap(),
            ])
            .args([
                "--max-new-tokens",
                "3",
                "--temperature",
                "0",
                "--device",
                "cpu",
                "--precision",
                precision,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value = serde_json::from_str(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        (
            line["token_ids"][0].as_u64().unwrap(),
            line["logprobs"][0].as_f64().unwrap(),
        )
    };
    let (fp32_token, fp32_lp) = first_logprob("fp32");
    let (bf16_token, bf16_lp) = first_logprob("bf16");
    std::fs::remove_file(&file).unwrap();
    assert_eq!(fp32_token, bf16_token, "greedy's first token");
    // bf16 storage rounds (the values differ) but stays within bf16's reach.
    assert!(fp32_lp != bf16_lp, "bf16 ran as fp32: {fp32_lp}");
    assert!(
        (fp32_lp - bf16_lp).abs() < 0.1,
        "fp32 {fp32_lp} vs bf16 {bf16_lp}"
    );
}
