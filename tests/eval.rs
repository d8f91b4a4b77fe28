//! `eval` end to end on a small generated benchmark with a tiny model.
//!
//! The fixture models have random weights and never write `\boxed{}`; the
//! reference grader then grades the word "None" (mathruler's behaviour), so
//! problems whose ground truth is "None" score 1 and the others 0: avg@n is
//! known exactly without a trained model.

mod common;

use common::fixtures::case_dir;
use vppo_engine::eval::{evaluate, EvalOptions};
use vppo_engine::model::engine::Engine;
use vppo_engine::ops::cpu::CpuBackend;
use vppo_engine::pipeline::Pipeline;
use vppo_engine::rollout::sampling::SamplingParams;

#[test]
fn eval_reports_average_accuracy_at_n() {
    let dir = std::env::temp_dir().join(format!("vppo-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        case_dir("single_noresize").join("img0.png"),
        dir.join("pic.png"),
    )
    .unwrap();
    let rows = [
        serde_json::json!({"problem": "<image>What is drawn?", "answer": "None", "images": ["pic.png"]}),
        serde_json::json!({"problem": "<image>How many?", "answer": "42", "images": ["pic.png"]}),
        serde_json::json!({"problem": "What is 2+2?", "answer": "none"}),
        serde_json::json!({"problem": "<image>Broken", "answer": "1", "images": ["missing.png"]}),
        serde_json::json!({"problem": "What is 3+4?", "answer": "7"}),
    ];
    let data = dir.join("bench.jsonl");
    std::fs::write(
        &data,
        rows.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let pipeline = Pipeline::load(&case_dir("single_noresize")).unwrap();
    let opts = EvalOptions {
        n: 3,
        sampling: SamplingParams::default(),
        max_new_tokens: 6,
        batch: 2,
        ..EvalOptions::default()
    };
    let mut problems = Vec::new();
    let mut skipped = Vec::new();
    let engine = Engine::new(CpuBackend, &pipeline.model).unwrap();
    let summary = evaluate(
        &pipeline,
        &engine,
        &data,
        &opts,
        &mut |p| problems.push(p.clone()),
        &mut |s| skipped.push(s.to_string()),
    )
    .unwrap();
    assert_eq!(summary.problems, 4);
    assert_eq!(summary.samples, 12);
    assert_eq!(summary.rows.corrupt, 1);
    assert!(
        skipped[0].contains("row 3") && skipped[0].contains("missing.png"),
        "{skipped:?}"
    );
    // Two of four problems have ground truth "None"/"none": avg@3 = 0.5.
    assert_eq!(summary.accuracy, 0.5);
    assert_eq!(
        problems.iter().map(|p| p.accuracy).collect::<Vec<_>>(),
        vec![1.0, 0.0, 1.0, 0.0]
    );
    assert!(problems
        .iter()
        .all(|p| p.responses.len() == 3
            && p.responses.iter().all(|r| r.tokens >= 1 && r.tokens <= 6)));
    assert!((summary.mean_response_tokens - summary.generated_tokens as f64 / 12.0).abs() < 1e-9);
    let table = summary.table(3);
    assert!(table.contains("avg accuracy@3 | 0.5000"), "{table}");
    // --limit stops after K usable problems.
    let limited = EvalOptions {
        limit: Some(2),
        ..opts.clone()
    };
    let s = evaluate(
        &pipeline,
        &engine,
        &data,
        &limited,
        &mut |_| {},
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(s.problems, 2);
    // The CLI writes one JSON line per problem and prints the table.
    let out = dir.join("results.jsonl");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .args([
            "eval",
            "--model",
            case_dir("single_noresize").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .args([
            "--n",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("avg accuracy@2 | 0.5000"), "{stdout}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["answer"], "None");
    assert_eq!(lines[0]["responses"].as_array().unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}
