//! `vppo-engine bench-rollout` at a tiny shape on the CPU: the path the GPU
//! check runs at 7B. Checks the cases, token counts and roofline bytes
//! against values worked out here from the shapes.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static RUNS: AtomicUsize = AtomicUsize::new(0);

fn run(args: &[&str]) -> (std::process::Output, Vec<serde_json::Value>) {
    let out_file = std::env::temp_dir().join(format!(
        "vppo-bench-rollout-{}-{}.jsonl",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .arg("bench-rollout")
        .args(args)
        .args(["--device", "cpu", "--out", out_file.to_str().unwrap()])
        .output()
        .unwrap();
    let lines = std::fs::read_to_string(&out_file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let _ = std::fs::remove_file(&out_file);
    (out, lines)
}

#[test]
fn bench_rollout_runs_every_case_with_its_roofline() {
    let (out, lines) = run(&[
        "--prompt-tokens",
        "40",
        "--image-side",
        "56",
        "--new-tokens",
        "12",
        "--batch",
        "2",
        "--batch",
        "3",
        "--mix-prompts",
        "3",
        "--mix-n",
        "2",
        "--max-num-seqs",
        "4",
        "--max-num-batched-tokens",
        "32",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["rollout batch 2", "rollout batch 3", "rollout mix 3x2"]
    );
    // The tiny default (hidden 64, intermediate 128, 2 layers, 2 KV heads
    // of 16, vocab 512, untied head), fp32: embedding and head 2 x 512 x 64,
    // final norm 64, per layer q 64x64+64, k and v 64x32+32, o 64x64,
    // MLP 3 x 64x128, two norms.
    let layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64;
    let weight_bytes = 4 * (2 * 512 * 64 + 64 + 2 * layer);
    // K and V, 2 layers, 32 values a token, f32.
    let kv_token_bytes = 2 * 2 * 32 * 4;
    for (l, seqs) in lines.iter().zip([2, 3, 6]) {
        assert_eq!(l["sequences"], seqs, "{l}");
        assert_eq!(l["prompt_tokens"], 40);
        assert_eq!(l["weight_bytes"], weight_bytes, "{l}");
        let kv = l["kv_bytes"].as_u64().unwrap() as usize;
        assert_eq!(kv % kv_token_bytes, 0);
        // Every sequence's prompt is read at least once.
        assert!(kv >= seqs * 40 * kv_token_bytes, "{l}");
        let steps = l["steps"].as_u64().unwrap() as f64;
        let roofline = l["roofline_s"].as_f64().unwrap();
        let want = (steps * weight_bytes as f64 + kv as f64) / 4800e9;
        assert!((roofline - want).abs() <= 1e-9 * want, "{l}");
        let seconds = l["seconds"].as_f64().unwrap();
        let pct = l["pct_of_roofline"].as_f64().unwrap();
        assert!((pct - 100.0 * roofline / seconds).abs() < 1e-6 * pct.max(1.0));
        // The CPU captures no graph: its decode steps run eagerly.
        assert_eq!(
            (l["bucketed_steps"].as_u64(), l["graph_replays"].as_u64()),
            (Some(0), Some(0)),
            "{l}"
        );
    }
    // End-of-sequence ignored: every sample makes its whole length.
    assert_eq!(lines[0]["output_tokens"], 2 * 12);
    assert_eq!(lines[1]["output_tokens"], 3 * 12);
    // The mix: Pareto(1.5) quantiles of scale 12/8 at frac(0.5 + 0.618034 k).
    let mix: usize = (0..6)
        .map(|k| {
            let u = (0.5 + k as f64 * 0.618_034).fract();
            ((1.5 / (1.0 - u).powf(1.0 / 1.5)).round() as usize).clamp(1, 12)
        })
        .sum();
    assert_eq!(lines[2]["output_tokens"], mix);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| l.contains("% of it")).count(), 3);
}

#[test]
fn bench_rollout_reads_a_config_and_refuses_bad_shapes() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2_5_vl/single_noresize/config.json");
    let (out, lines) = run(&[
        "--config",
        fixture.to_str().unwrap(),
        "--prompt-tokens",
        "30",
        "--image-side",
        "28",
        "--new-tokens",
        "3",
        "--batch",
        "2",
        "--mix-prompts",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["output_tokens"], 6);
    let (out, _) = run(&["--image-side", "30", "--batch", "1", "--mix-prompts", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--image-side 30"),
        "{stderr}"
    );
    let (out, _) = run(&["--config", "/no/such/config.json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("/no/such/config.json"),
        "{stderr}"
    );
}
