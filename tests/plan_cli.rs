//! `vppo-engine plan` end to end on the shipped configs: the table, the
//! verdict and the exit status; bad input named clearly.

use std::process::{Command, Output};

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("plan")
        .args(args)
        .output()
        .expect("run vppo-engine plan")
}

const SMALL_RUN: [&str; 6] = [
    "recompute=true",
    "max_tokens_per_micro_batch=16384",
    "rollout_batch=16",
    "mini_batch=16",
    "max_prompt_tokens=1024",
    "max_response_tokens=1024",
];

#[test]
fn a_3b_run_fits_80_gib_and_the_recipe_7b_does_not() {
    let out = plan(&[&["--model", "configs/models/qwen2.5-vl-3b"], &SMALL_RUN[..]].concat());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    for row in [
        "3.75B parameters",
        "bf16 weights",
        "fp32 master weights",
        "AdamW moments",
        "gradients (fp32)",
        "activations, recompute on",
        "activations, recompute off",
        "KV cache",
        "workspace",
        "fits: yes",
    ] {
        assert!(table.contains(row), "missing `{row}`:\n{table}");
    }
    // The recipe's defaults at 7B: 139 GiB of weights and optimizer state.
    let out = plan(&["--model", "configs/models/qwen2.5-vl-7b/config.json"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(
        table.contains("8.29B parameters") && table.contains("fits: NO"),
        "{table}"
    );
    assert!(table.contains("to fit:"), "{table}");
}

#[test]
fn a_missing_model_is_named() {
    let out = plan(&["--model", "no/such/dir"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no/such/dir"), "{err}");
    let out = plan(&["--gpu-mem", "0", "--model", "configs/models/qwen2.5-vl-3b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--gpu-mem"), "{err}");
}

#[test]
fn a_7b_run_fits_80_gib_gpus_from_four_with_zero2_three_with_zero3() {
    let run = [
        "micro_batch=16",
        "max_tokens_per_micro_batch=16384",
        "max_prompt_tokens=512",
        "max_response_tokens=512",
        "max_pixels=200704",
        "recompute=true",
        "rollout_batch=32",
        "mini_batch=32",
    ];
    let model = ["--model", "configs/models/qwen2.5-vl-7b"];
    let one = plan(&[&model[..], &run[..]].concat());
    let one_table = String::from_utf8_lossy(&one.stdout);
    assert!(!one.status.success(), "{one_table}");
    assert!(
        one_table.contains("fewest GPUs of 80.0 GiB that fit (ZeRO-2): 4"),
        "{one_table}"
    );
    let four = plan(&[&model[..], &["--gpus", "4"], &run[..]].concat());
    let table = String::from_utf8_lossy(&four.stdout);
    assert!(four.status.success(), "{table}");
    for row in [
        "per GPU of 4 data-parallel GPUs (ZeRO-2)",
        "fp32 master weights (1/4 shard, ZeRO-2)",
        "AdamW moments (fp32 m, v) (1/4 shard, ZeRO-2)",
        "gradients (fp32, whole until the step's reduce-scatter)",
        "optimizer step (ZeRO-2)",
        "fits: yes",
    ] {
        assert!(table.contains(row), "missing `{row}`:\n{table}");
    }
    // The per-GPU state shrinks with the GPUs: 8 need less than 4.
    let peak = |t: &str| -> f64 {
        t.lines()
            .find(|l| l.contains("peak:"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .expect("a peak row")
    };
    let eight = plan(&[&model[..], &["--gpus", "8"], &run[..]].concat());
    assert!(peak(&String::from_utf8_lossy(&eight.stdout)) < peak(&table));
    // ZeRO-3 shards the weights and gradients too: less per GPU than
    // ZeRO-2 on as many GPUs, and 3 GPUs are enough.
    let z3 = plan(&[&model[..], &["--gpus", "4", "--zero-stage", "3"], &run[..]].concat());
    let z3_table = String::from_utf8_lossy(&z3.stdout);
    assert!(z3.status.success(), "{z3_table}");
    for row in [
        "bf16 weights (1/4 shard, ZeRO-3)",
        "gradients (fp32) (1/4 shard, ZeRO-3)",
        "gathered root + 2 largest units (weights and gradients)",
        "whole weights, gathered for this phase (ZeRO-3)",
        "fewest GPUs of 80.0 GiB that fit (ZeRO-3): 3",
    ] {
        assert!(z3_table.contains(row), "missing `{row}`:\n{z3_table}");
    }
    assert!(peak(&z3_table) < peak(&table));
    let bad = plan(&[&model[..], &["--gpus", "8", "--zero-stage", "4"], &run[..]].concat());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("zero_stage = 4"),
        "{err}"
    );
}
