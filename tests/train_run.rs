//! `vppo-engine train` end to end on the built-in default, kept small:
//! the run directory's contents, exact resume, refusing to overwrite a run,
//! clear errors, and the grpo baseline.

use std::path::{Path, PathBuf};
use vppo_engine::train::metrics::{read_metrics, StepMetrics};
use vppo_engine::train::run::{run, METRICS_FILE, PLOT_FILE};

fn run_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vppo-run-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A few warm-up and RL steps: enough to exercise every part of the loop.
fn small(extra: &[&str]) -> Vec<String> {
    let mut o: Vec<String> = [
        // Enough warm-up for a reward near chance (0.2), so groups are mixed.
        "warmup_steps=60",
        "warmup_batch=16",
        "rollout_batch=4",
        "mini_batch=2",
        "group_size=4",
        "save_every=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    o.extend(extra.iter().map(|s| s.to_string()));
    o
}

/// Everything but the wall-clock fields.
fn without_timing(m: &[StepMetrics]) -> Vec<StepMetrics> {
    m.iter()
        .cloned()
        .map(|mut r| {
            r.step_time_s = 0.0;
            r.tokens_per_s = 0.0;
            r
        })
        .collect()
}

fn checkpoints(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    names
}

#[test]
fn builtin_run_writes_metrics_checkpoints_and_plot() {
    let dir = run_dir("outputs");
    let summary = run(None, &small(&["max_steps=4"]), Some(&dir), false, false).unwrap();
    assert_eq!(summary.steps, 4);
    // keep_checkpoints trims old ones once a newer one is complete.
    let trimmed = run_dir("trimmed");
    run(
        None,
        &small(&["max_steps=4", "keep_checkpoints=1"]),
        Some(&trimmed),
        false,
        false,
    )
    .unwrap();
    assert_eq!(checkpoints(&trimmed), vec!["checkpoint-00000004"]);
    std::fs::remove_dir_all(&trimmed).unwrap();
    let metrics = read_metrics(&dir.join(METRICS_FILE)).unwrap();
    assert_eq!(
        metrics.iter().map(|m| m.step).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    for m in &metrics {
        assert!(
            (0.0..=1.0).contains(&m.reward_mean) && m.entropy > 0.0,
            "{m:?}"
        );
        let dep = m.visual_dependency_mean.expect("vppo computes dependency");
        assert!(dep.is_finite() && dep >= 0.0);
        // TGF keeps ceil(0.4 len) of each response: between 40% and 100%.
        assert!((0.4..=1.0).contains(&m.tgf_kept_frac), "{m:?}");
        assert!(m.adv_scale_min <= m.adv_scale_max && m.adv_scale_min >= 0.0);
        assert!(m.response_len_mean >= 1.0 && m.tokens_per_s > 0.0 && m.step_time_s > 0.0);
        assert_eq!(m.groups, 2);
    }
    // The raw JSON lines carry the names the issue lists.
    let line = std::fs::read_to_string(dir.join(METRICS_FILE)).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "reward_mean",
        "accuracy",
        "loss",
        "entropy",
        "visual_dependency_mean",
        "tgf_kept_frac",
        "adv_scale_min",
        "adv_scale_max",
        "response_len_mean",
        "filtered_groups",
        "step_time_s",
        "tokens_per_s",
    ] {
        assert!(first.get(key).is_some(), "metrics lack {key}: {first}");
    }
    // Warm-up checkpoint (step 0), then every 2 steps.
    assert_eq!(
        checkpoints(&dir),
        vec![
            "checkpoint-00000000",
            "checkpoint-00000002",
            "checkpoint-00000004"
        ]
    );
    let last = summary.checkpoint.unwrap();
    assert!(last.join("model.safetensors").is_file() && last.join("tokenizer.json").is_file());
    // The saved checkpoint is a loadable model directory.
    vppo_engine::pipeline::Pipeline::load(&last).unwrap();
    let png = image::open(dir.join(PLOT_FILE)).unwrap();
    assert!(png.width() >= 800 && png.height() >= 600);
    let saved = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(saved.contains("max_steps = 4"), "{saved}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let whole = run_dir("whole");
    run(None, &small(&["max_steps=6"]), Some(&whole), false, false).unwrap();
    let reference = read_metrics(&whole.join(METRICS_FILE)).unwrap();
    assert_eq!(reference.len(), 6);

    // Stop after 4 steps, then resume to 6.
    let split = run_dir("split");
    run(None, &small(&["max_steps=4"]), Some(&split), false, false).unwrap();
    // Pretend the first run died after writing a step past its checkpoint:
    // the resumed run drops that line and redoes the step.
    let mut extra = reference[4].clone();
    extra.reward_mean = -1.0;
    std::fs::write(
        split.join(METRICS_FILE),
        std::fs::read_to_string(split.join(METRICS_FILE)).unwrap()
            + &serde_json::to_string(&extra).unwrap()
            + "\n",
    )
    .unwrap();
    run(
        None,
        &["max_steps=6".to_string()],
        Some(&split),
        true,
        false,
    )
    .unwrap();
    let resumed = read_metrics(&split.join(METRICS_FILE)).unwrap();
    assert_eq!(without_timing(&resumed), without_timing(&reference));
    std::fs::remove_dir_all(&whole).unwrap();
    std::fs::remove_dir_all(&split).unwrap();
}

#[test]
fn grpo_baseline_runs_without_the_perturbed_pass() {
    let dir = run_dir("grpo");
    run(
        None,
        &small(&["max_steps=2", "algo=grpo"]),
        Some(&dir),
        false,
        false,
    )
    .unwrap();
    let metrics = read_metrics(&dir.join(METRICS_FILE)).unwrap();
    assert_eq!(metrics.len(), 2);
    for m in &metrics {
        assert_eq!(m.visual_dependency_mean, None);
        assert_eq!(
            (m.tgf_kept_frac, m.adv_scale_min, m.adv_scale_max),
            (1.0, 1.0, 1.0)
        );
        assert_eq!(m.filtered_groups, 0, "grpo has no dynamic sampling");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_existing_run_is_never_overwritten_and_bad_settings_are_named() {
    let dir = run_dir("guard");
    run(
        None,
        &small(&["max_steps=1", "algo=grpo"]),
        Some(&dir),
        false,
        false,
    )
    .unwrap();
    let err = run(None, &small(&["max_steps=1"]), Some(&dir), false, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--resume") && err.contains("already holds a run"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let fresh = run_dir("nothing");
    let err = run(None, &[], Some(&fresh), true, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no run to resume"), "{err}");
    let err = run(None, &["mini_batch=3".into()], Some(&fresh), false, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiple of mini_batch"), "{err}");
    let err = run(
        None,
        &["model=/no/such/model".into(), "max_steps=1".into()],
        Some(&fresh),
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/no/such/model"), "{err}");
    let _ = std::fs::remove_dir_all(&fresh);

    // device=cuda without a usable GPU fails naming the device, before the
    // warm-up and before anything is written; auto falls back to the CPU
    // (every other run here).
    if !vppo_engine::backend::gpu_usable() {
        let gpu = run_dir("no-gpu");
        let err = run(
            None,
            &small(&["max_steps=1", "device=cuda"]),
            Some(&gpu),
            false,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("device=cuda: no usable CUDA device"), "{err}");
        assert!(!gpu.exists(), "nothing written before the device check");
    }

    // An untrained model never answers: no group has mixed rewards, and the
    // run says so instead of spinning.
    let stuck = run_dir("stuck");
    let err = run(
        None,
        &small(&["warmup_steps=0", "max_gen_batches=1"]),
        Some(&stuck),
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no group with mixed rewards"), "{err}");
    let _ = std::fs::remove_dir_all(&stuck);
}

/// Training on a data set (JSONL with image paths, one corrupt row): epochs
/// are streamed in order, the corrupt row is skipped each pass, and the run
/// ends when the data is exhausted; a resumed run continues at the same row.
#[test]
fn dataset_runs_stream_epochs_and_resume_at_the_same_row() {
    use vppo_engine::builtin::CountingTask;
    let dir = run_dir("data");
    std::fs::create_dir_all(&dir).unwrap();
    let task = CountingTask::new(2, 5);
    let mut lines = Vec::new();
    for i in 0..5u64 {
        let item = task.item(i);
        let name = format!("img{i}.png");
        image::RgbImage::from_raw(56, 56, item.image.data.clone())
            .unwrap()
            .save(dir.join(&name))
            .unwrap();
        lines.push(
            serde_json::json!({"problem": format!("<image>{}", item.question), "answer": item.answer, "images": [name]})
                .to_string(),
        );
        if i == 2 {
            lines.push(
                serde_json::json!({"problem": "<image>?", "answer": "1", "images": ["missing.png"]})
                    .to_string(),
            );
        }
    }
    let data = dir.join("train.jsonl");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl/single_noresize");
    let settings = |extra: &[&str]| -> Vec<String> {
        let mut o = vec![
            format!("model={:?}", model.display().to_string()),
            format!("data={:?}", data.display().to_string()),
            // The random fixture model never answers right: grpo still
            // updates (no dynamic sampling), with zero advantages.
            "algo=grpo".into(),
            "rollout_batch=2".into(),
            "mini_batch=1".into(),
            "group_size=2".into(),
            "epochs=2".into(),
            "max_response_tokens=3".into(),
            "min_pixels=3136".into(),
            "max_pixels=3136".into(),
            "prompt_suffix=''".into(),
            "save_every=2".into(),
            "bf16=false".into(),
        ];
        o.extend(extra.iter().map(|s| s.to_string()));
        o
    };
    let whole = dir.join("whole");
    let summary = run(None, &settings(&[]), Some(&whole), false, false).unwrap();
    // 5 usable rows x 2 epochs = 10 prompts = 5 rollout batches of 2 updates.
    assert_eq!(summary.steps, 10);
    assert_eq!(
        summary.skipped_rows,
        (1, 0),
        "the corrupt row is counted once, not once per epoch"
    );
    let reference = read_metrics(&whole.join(METRICS_FILE)).unwrap();
    assert_eq!(reference.len(), 10);
    assert!(reference
        .iter()
        .all(|m| m.reward_mean == 0.0 && m.groups == 1));

    let split = dir.join("split");
    run(
        None,
        &settings(&["max_steps=4"]),
        Some(&split),
        false,
        false,
    )
    .unwrap();
    run(None, &["max_steps=0".into()], Some(&split), true, false).unwrap();
    let resumed = read_metrics(&split.join(METRICS_FILE)).unwrap();
    assert_eq!(without_timing(&resumed), without_timing(&reference));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn print_config_shows_the_resolved_settings() {
    use vppo_engine::train::config::{AlgoName, TrainConfig};
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .args(["train", "--print-config", "--algo", "grpo", "lr=2e-3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: TrainConfig = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!((cfg.algo, cfg.lr), (AlgoName::Grpo, 2e-3));
    assert_eq!(cfg.rollout_batch, 16, "the built-in preset");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .args(["train", "--print-config", "clip_low=lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("clip_low"));
}
