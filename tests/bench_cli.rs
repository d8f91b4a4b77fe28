//! `vppo-engine bench` end to end at a tiny shape on the CPU: the step
//! runs (forward, backward, AdamW) and prints its figures and JSON line.

use std::process::Command;

#[test]
fn a_tiny_model_step_prints_its_figures() {
    let out = Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "bench",
            "--model",
            "tests/fixtures/qwen2_5_vl/single_noresize/config.json",
            "--device",
            "cpu",
            "--seqs",
            "2",
            "--seq-len",
            "24",
            "--response-len",
            "8",
            "--image-side",
            "56",
            "--steps",
            "1",
            "--json",
        ])
        .output()
        .expect("run vppo-engine bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("tokens/s") && stdout.contains("MFU n/a"),
        "{stdout}"
    );
    assert!(
        stderr.contains("step 2: forward + backward") && stderr.contains("AdamW"),
        "{stderr}"
    );
    let json: serde_json::Value = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .expect("--json prints one line");
    assert_eq!(json["tokens"], 48);
    assert_eq!(json["response_tokens"], 16);
    assert!(json["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0));
    // A shape the prompt cannot hold is refused before any work.
    let out = Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "bench",
            "--model",
            "tests/fixtures/qwen2_5_vl/single_noresize",
            "--device",
            "cpu",
            "--image-side",
            "450",
        ])
        .output()
        .expect("run vppo-engine bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("multiple of 28"),
        "{stderr}"
    );
}
