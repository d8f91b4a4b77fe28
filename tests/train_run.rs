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
    // The newest one, plus the best by validation accuracy when that is
    // another one.
    let kept = checkpoints(&trimmed);
    let best = std::fs::read_to_string(trimmed.join("best")).unwrap();
    let mut want = vec![best.trim().to_string(), "checkpoint-00000004".to_string()];
    want.dedup();
    assert_eq!(kept, want);
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
    let first: serde_json::Value = line
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v.get("reward_mean").is_some())
        .unwrap();
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
    let bad_val = run_dir("bad-val");
    let err = run(
        None,
        &small(&["max_steps=1", "val_data=/no/such/val.jsonl"]),
        Some(&bad_val),
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("/no/such/val.jsonl") && err.contains("no such file"),
        "{err}"
    );
    assert!(!bad_val.exists(), "checked before anything is written");
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
    // Uncapped regeneration gives up after 20 generation batches, and no
    // update was made.
    let err = run(
        None,
        &small(&["warmup_steps=0", "max_gen_batches=0"]),
        Some(&stuck),
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("20 generation batches in a row had no group with mixed rewards"),
        "{err}"
    );
    assert!(read_metrics(&stuck.join(METRICS_FILE)).map_or(true, |m| m.is_empty()));
    let _ = std::fs::remove_dir_all(&stuck);
}

/// Training on a data set (JSONL with image paths, one corrupt row): the
/// epochs are shuffled, the corrupt row is skipped whenever it comes up, and
/// the run makes `floor(rows / rollout_batch) x epochs` rollout batches; a
/// resumed run continues at the same row.
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
    // 6 rows (one corrupt): floor(6 / 2) x 2 epochs = 6 rollout batches of
    // 2 prompts, 2 updates each.
    assert_eq!(summary.steps, 12);
    assert_eq!(
        summary.skipped_rows,
        (1, 0),
        "the corrupt row is counted once, not once per epoch"
    );
    let reference = read_metrics(&whole.join(METRICS_FILE)).unwrap();
    assert_eq!(reference.len(), 12);
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

    // Validation on a data set (the same file: its corrupt row is skipped),
    // before training, every rollout batch, and capped by val_max_samples.
    let validated = dir.join("validated");
    let val_data = format!("val_data={:?}", data.display().to_string());
    run(
        None,
        &settings(&["max_steps=4", &val_data, "val_freq=1"]),
        Some(&validated),
        false,
        false,
    )
    .unwrap();
    let val = vppo_engine::train::metrics::read_validations(&validated.join(METRICS_FILE)).unwrap();
    // Due at the end of the rollout batch that reaches a multiple of
    // val_freq: here every batch (2 updates each).
    assert_eq!(
        val.iter().map(|v| v.step).collect::<Vec<_>>(),
        vec![0, 2, 4]
    );
    assert!(val.iter().all(|v| v.problems == 5), "{val:?}");
    // The random fixture model never boxes an answer.
    assert!(val.iter().all(|v| v.accuracy == 0.0), "{val:?}");
    let capped = dir.join("capped");
    run(
        None,
        &settings(&["max_steps=1", &val_data, "val_max_samples=3", "val_n=2"]),
        Some(&capped),
        false,
        false,
    )
    .unwrap();
    let val = vppo_engine::train::metrics::read_validations(&capped.join(METRICS_FILE)).unwrap();
    assert!(val.iter().all(|v| v.problems == 3), "{val:?}");
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

/// With a model and data, `--print-config` shows the reference's layout and
/// data handling; the built-in task keeps its own.
#[test]
fn print_config_with_a_model_and_data_shows_the_recipe() {
    use vppo_engine::train::config::TrainConfig;
    let print = |args: &[&str]| -> TrainConfig {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
            .args(["train", "--print-config"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap()
    };
    let recipe = print(&["--model", "/models/qwen", "--data", "data/train-*.parquet"]);
    assert_eq!(
        (
            recipe.micro_batch,
            recipe.tas_partitions,
            recipe.shuffle,
            recipe.max_gen_batches,
            recipe.max_steps,
            recipe.epochs
        ),
        (16, 8, true, 0, 0, 2)
    );
    assert_eq!((recipe.min_pixels, recipe.max_pixels), (200_704, 1_003_520));
    let builtin = print(&[]);
    assert_eq!(
        (
            builtin.tas_partitions,
            builtin.max_gen_batches,
            builtin.micro_batch
        ),
        (1, 3, 64)
    );
}

/// Validation during training, checkpoint retention with `best`, and the
/// TensorBoard log, on the built-in task: validation before training,
/// every `val_freq` steps and at the end on the fixed held-out split; at
/// most keep_checkpoints + best checkpoints left; every metric a scalar.
#[test]
fn builtin_run_validates_keeps_the_best_and_logs_to_tensorboard() {
    use vppo_engine::train::metrics::read_validations;
    use vppo_engine::train::tensorboard::read_scalars;
    let dir = run_dir("validate");
    let summary = run(
        None,
        &small(&["max_steps=6", "val_freq=2", "save_limit=1"]),
        Some(&dir),
        false,
        false,
    )
    .unwrap();
    let val = read_validations(&dir.join(METRICS_FILE)).unwrap();
    assert_eq!(
        val.iter().map(|v| v.step).collect::<Vec<_>>(),
        vec![0, 2, 4, 6],
        "before training, every 2 steps"
    );
    for v in &val {
        assert!((0.0..=1.0).contains(&v.accuracy), "{v:?}");
        assert_eq!(v.problems, 64, "the built-in held-out split");
        assert!(v.response_len_mean >= 1.0);
    }
    // The split is a real eval data set in the run directory.
    assert!(dir.join("val/builtin-val.jsonl").is_file() && dir.join("val/000.png").is_file());
    // `best` names the checkpoint of the first highest validation.
    let best_val = val
        .iter()
        .fold(
            None::<&vppo_engine::train::metrics::ValMetrics>,
            |b, v| match b {
                Some(b) if b.accuracy >= v.accuracy => Some(b),
                _ => Some(v),
            },
        )
        .unwrap();
    let best = std::fs::read_to_string(dir.join("best")).unwrap();
    assert_eq!(best.trim(), format!("checkpoint-{:08}", best_val.step));
    assert_eq!(summary.best, Some(dir.join(best.trim())));
    assert_eq!(summary.last_validation, Some((6, val[3].accuracy)));
    // save_limit = 1 (EasyR1's name): the newest plus the best.
    let mut want = vec![best.trim().to_string(), "checkpoint-00000006".to_string()];
    want.sort();
    want.dedup();
    assert_eq!(checkpoints(&dir), want);
    // TensorBoard: one event file under tb/, every step metric and every
    // validation as scalars at their steps.
    let files: Vec<_> = std::fs::read_dir(dir.join("tb"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let scalars = read_scalars(&files[0]).unwrap();
    let series = |tag: &str| -> Vec<(u64, f32)> {
        scalars
            .iter()
            .filter(|(_, t, _)| t == tag)
            .map(|(s, _, v)| (*s, *v))
            .collect()
    };
    let metrics = read_metrics(&dir.join(METRICS_FILE)).unwrap();
    assert_eq!(
        series("reward_mean"),
        metrics
            .iter()
            .map(|m| (m.step, m.reward_mean as f32))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        series("val/accuracy"),
        val.iter()
            .map(|v| (v.step, v.accuracy as f32))
            .collect::<Vec<_>>()
    );
    for tag in [
        "loss",
        "entropy",
        "grad_norm",
        "visual_dependency_mean",
        "tokens_per_s",
        "val/response_len_mean",
    ] {
        assert!(!series(tag).is_empty(), "no {tag} in TensorBoard");
    }
    // Stopped after 2 steps and resumed: the same validations, the same
    // best (the best score so far comes back from the metrics), and a
    // second event file whose restart marker tells TensorBoard to drop
    // what the first attempt logged after step 2.
    let split = run_dir("validate-split");
    let settings = small(&["max_steps=2", "val_freq=2", "save_limit=1"]);
    run(None, &settings, Some(&split), false, false).unwrap();
    run(None, &["max_steps=6".into()], Some(&split), true, false).unwrap();
    let again = read_validations(&split.join(METRICS_FILE)).unwrap();
    let acc = |v: &[vppo_engine::train::metrics::ValMetrics]| -> Vec<(u64, f64)> {
        v.iter().map(|v| (v.step, v.accuracy)).collect()
    };
    assert_eq!(acc(&again), acc(&val));
    assert_eq!(
        std::fs::read_to_string(split.join("best")).unwrap(),
        best,
        "the same best checkpoint"
    );
    assert_eq!(std::fs::read_dir(split.join("tb")).unwrap().count(), 2);
    std::fs::remove_dir_all(&split).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The KL loss (off by default): the reference is the warmed-up model,
/// saved once; the first update starts on the reference (KL 0 up to
/// float noise), later ones have moved away from it.
#[test]
fn kl_to_the_reference_is_logged_and_off_by_default() {
    let dir = run_dir("kl");
    run(
        None,
        &small(&[
            "max_steps=4",
            "use_kl_loss=true",
            "kl_coef=0.1",
            "kl_estimator=k2",
            "tensorboard=false",
            "val_before_train=false",
        ]),
        Some(&dir),
        false,
        false,
    )
    .unwrap();
    let metrics = read_metrics(&dir.join(METRICS_FILE)).unwrap();
    let kl: Vec<f64> = metrics
        .iter()
        .map(|m| m.kl_mean.expect("kl_mean"))
        .collect();
    assert!(
        kl[0].abs() < 1e-9,
        "the first update starts at the reference: {kl:?}"
    );
    assert!(kl[1..].iter().all(|k| *k > 1e-9 && k.is_finite()), "{kl:?}");
    assert!(dir.join("reference-model/config.json").is_file());
    assert!(!dir.join("tb").exists(), "tensorboard=false writes none");
    std::fs::remove_dir_all(&dir).unwrap();
    // Off by default: no kl_mean in the metrics, no reference written.
    let plain = run_dir("no-kl");
    run(None, &small(&["max_steps=2"]), Some(&plain), false, false).unwrap();
    let text = std::fs::read_to_string(plain.join(METRICS_FILE)).unwrap();
    assert!(!text.contains("kl_mean") && !plain.join("reference-model").exists());
    std::fs::remove_dir_all(&plain).unwrap();
}

/// A custom reward program replaces the accuracy reward: its scores are
/// the rewards and its extra keys are logged; a bad reply stops the run
/// naming the row.
#[test]
fn a_reward_command_scores_the_rollouts() {
    let dir = run_dir("reward-cmd");
    std::fs::create_dir_all(&dir).unwrap();
    // Rewards responses by their length's parity (mixed groups even from
    // an untrained model), and reports the length.
    let script = dir.join("my_reward.py");
    std::fs::write(
        &script,
        "import json, sys\n\
         for line in sys.stdin:\n\
         \x20   r = json.loads(line)\n\
         \x20   n = len(r['response'])\n\
         \x20   print(json.dumps({'score': float(n % 2), 'chars': n}), flush=True)\n",
    )
    .unwrap();
    let out = dir.join("run");
    let cmd = format!("reward_command=\"python3 {}\"", script.display());
    run(
        None,
        &small(&[
            "max_steps=2",
            "warmup_steps=0",
            "algo=grpo",
            &cmd,
            "val_before_train=false",
            "val_freq=0",
        ]),
        Some(&out),
        false,
        false,
    )
    .unwrap();
    let lines = std::fs::read_to_string(out.join(METRICS_FILE)).unwrap();
    let steps: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("reward_mean").is_some())
        .collect();
    assert_eq!(steps.len(), 2);
    for v in &steps {
        let chars = v["reward/chars"].as_f64().expect("the extra key is logged");
        assert!(chars >= 1.0, "{v}");
    }
    let bad = dir.join("bad");
    let err = run(
        None,
        &small(&[
            "max_steps=1",
            "warmup_steps=0",
            "reward_command=\"echo nonsense\"",
        ]),
        Some(&bad),
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("row 0") && err.contains("not JSON"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two data sets mixed 2:1 (`data = [a, b]`, `data_weights`): every
/// prompt drawn is one row of one file, the run ends when a drawn file
/// runs out, and a resumed run draws the same mix (same metrics, same rows
/// of each file consumed).
#[test]
fn mixed_data_sets_resume_the_same_mix() {
    use vppo_engine::builtin::CountingTask;
    let dir = run_dir("mix");
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (f, seed) in [("a", 5u64), ("b", 6)] {
        let task = CountingTask::new(2, seed);
        let mut lines = Vec::new();
        for i in 0..6u64 {
            let item = task.item(i);
            let name = format!("{f}{i}.png");
            image::RgbImage::from_raw(56, 56, item.image.data.clone())
                .unwrap()
                .save(dir.join(&name))
                .unwrap();
            lines.push(
                serde_json::json!({"problem": format!("<image>{}", item.question), "answer": item.answer, "images": [name]})
                    .to_string(),
            );
        }
        let path = dir.join(format!("{f}.jsonl"));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        files.push(path.display().to_string());
    }
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl/single_noresize");
    let settings = |extra: &[&str]| -> Vec<String> {
        let mut o = vec![
            format!("model={:?}", model.display().to_string()),
            format!("data=[{:?}, {:?}]", files[0], files[1]),
            "data_weights=[2, 1]".into(),
            "seed=4".into(),
            "algo=grpo".into(),
            "rollout_batch=2".into(),
            "mini_batch=1".into(),
            "group_size=2".into(),
            "epochs=1".into(),
            "max_response_tokens=2".into(),
            "min_pixels=3136".into(),
            "max_pixels=3136".into(),
            "prompt_suffix=''".into(),
            "save_every=2".into(),
            "bf16=false".into(),
            "tensorboard=false".into(),
        ];
        o.extend(extra.iter().map(|s| s.to_string()));
        o
    };
    let state = |run: &Path| -> serde_json::Value {
        let latest = std::fs::read_to_string(run.join("latest")).unwrap();
        let text =
            std::fs::read_to_string(run.join(latest.trim()).join("trainer_state.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["state"].clone()
    };
    let whole = dir.join("whole");
    let summary = run(None, &settings(&[]), Some(&whole), false, false).unwrap();
    let s = state(&whole);
    let positions: Vec<u64> = serde_json::from_value(s["extra"]["data_positions"].clone()).unwrap();
    let draws = s["data_position"].as_u64().unwrap();
    // Every step trained on one prompt; each was one row of one file.
    assert_eq!(positions.iter().sum::<u64>(), draws, "{s}");
    // Seed 4 draws a a b a a a a b, then a again: a (6 rows) has run out
    // and the mix ends (first exhausted).
    assert_eq!((positions.clone(), summary.steps), (vec![6, 2], 8), "{s}");
    let reference = read_metrics(&whole.join(METRICS_FILE)).unwrap();
    let split = dir.join("split");
    run(
        None,
        &settings(&["max_steps=2"]),
        Some(&split),
        false,
        false,
    )
    .unwrap();
    run(None, &["max_steps=0".into()], Some(&split), true, false).unwrap();
    let resumed = read_metrics(&split.join(METRICS_FILE)).unwrap();
    assert_eq!(without_timing(&resumed), without_timing(&reference));
    assert_eq!(
        state(&split)["extra"]["data_positions"],
        s["extra"]["data_positions"]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The reference's training length on a sharded data set: `floor(rows /
/// rollout_batch) x epochs` rollout batches, each filled however many
/// generation batches dynamic sampling needs (no cap), the data restarting
/// (a fresh shuffle) whenever it runs out; a resumed run continues the
/// same shuffled order.
#[test]
fn a_data_set_run_counts_rollout_batches_and_restarts_the_data_for_dynamic_sampling() {
    use vppo_engine::builtin::CountingTask;
    let dir = run_dir("length");
    let shards = dir.join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let task = CountingTask::new(2, 5);
    // Six rows over two shards: "keep" problems get mixed rewards from the
    // reward program, "drop" problems all zero (filtered).
    let mut rows = Vec::new();
    for i in 0..6u64 {
        let item = task.item(i);
        let name = format!("img{i}.png");
        image::RgbImage::from_raw(56, 56, item.image.data.clone())
            .unwrap()
            .save(shards.join(&name))
            .unwrap();
        let kind = if i % 2 == 0 { "keep" } else { "drop" };
        rows.push(
            serde_json::json!({"problem": format!("  <image>{kind} {i}\n"), "answer": "1", "images": [name]})
                .to_string(),
        );
    }
    std::fs::write(
        shards.join("train-00000-of-00002.jsonl"),
        rows[..4].join("\n") + "\n",
    )
    .unwrap();
    std::fs::write(
        shards.join("train-00001-of-00002.jsonl"),
        rows[4..].join("\n") + "\n",
    )
    .unwrap();
    let script = dir.join("reward.py");
    std::fs::write(
        &script,
        "import json, sys\n\
         for line in sys.stdin:\n\
         \x20   r = json.loads(line)\n\
         \x20   keep = r['problem'].startswith('<image>keep')\n\
         \x20   print(json.dumps({'score': float(keep and r['index'] % 2), 'trimmed': float(r['problem'] == r['problem'].strip())}), flush=True)\n",
    )
    .unwrap();
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl/single_noresize");
    let settings = |extra: &[&str]| -> Vec<String> {
        let mut o = vec![
            format!("model={:?}", model.display().to_string()),
            format!("data={:?}", shards.display().to_string()),
            format!("reward_command=\"python3 {}\"", script.display()),
            "algo=dapo".into(),
            "rollout_batch=2".into(),
            "mini_batch=1".into(),
            "group_size=2".into(),
            "epochs=2".into(),
            "max_response_tokens=2".into(),
            "min_pixels=3136".into(),
            "max_pixels=3136".into(),
            "prompt_suffix=''".into(),
            "save_every=2".into(),
            "bf16=false".into(),
            "tensorboard=false".into(),
        ];
        o.extend(extra.iter().map(|s| s.to_string()));
        o
    };
    let whole = dir.join("whole");
    let summary = run(None, &settings(&[]), Some(&whole), false, false).unwrap();
    // floor(6 / 2) x 2 = 6 rollout batches of 2 kept groups: 12 updates.
    assert_eq!(summary.steps, 12);
    let reference = read_metrics(&whole.join(METRICS_FILE)).unwrap();
    assert_eq!(reference.len(), 12);
    assert!(reference.iter().all(|m| m.groups == 1));
    let batches: Vec<u64> = reference.iter().map(|m| m.rollout_batch).collect();
    assert_eq!(batches, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]);
    // Half the groups are filtered: batches needed more than one
    // generation batch, and the run read past its two epochs of 6 rows.
    assert!(reference.iter().any(|m| m.gen_batches > 1));
    let latest = std::fs::read_to_string(whole.join("latest")).unwrap();
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(whole.join(latest.trim()).join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    let rows_read = state["state"]["data_position"].as_u64().unwrap();
    assert!(rows_read > 12, "{rows_read} rows: the data restarted");
    // The problems reach the reward trimmed.
    assert!(reference.iter().all(|m| m.extra["reward/trimmed"] == 1.0));

    // Stopped after 4 updates and resumed: the same shuffled prompts.
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

/// `precision = "bf16"` on the CPU trains on the bf16 twin: checkpoints
/// carry the fp32 masters beside the bf16 weights, and a resumed run
/// continues exactly (same masters, moments and bf16 copies).
#[test]
fn a_bf16_run_saves_its_masters_and_resumes_exactly() {
    let bf16 = ["precision=bf16", "device=cpu"];
    let whole = run_dir("bf16-whole");
    let mut o = bf16.to_vec();
    o.push("max_steps=4");
    run(None, &small(&o), Some(&whole), false, false).unwrap();
    let reference = read_metrics(&whole.join(METRICS_FILE)).unwrap();
    assert_eq!(reference.len(), 4);
    let config = std::fs::read_to_string(whole.join("config.toml")).unwrap();
    assert!(config.contains("precision = \"bf16\""), "{config}");
    let optimizer = std::fs::read(whole.join("checkpoint-00000004/optimizer.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&optimizer).unwrap();
    assert!(tensors.names().iter().any(|n| n.starts_with("master.")));
    let model = std::fs::read(whole.join("checkpoint-00000004/model.safetensors")).unwrap();
    let weights = safetensors::SafeTensors::deserialize(&model).unwrap();
    let (name, view) = weights.tensors().into_iter().next().unwrap();
    let values: Vec<f32> = view
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert!(
        values
            .iter()
            .all(|&x| half::bf16::from_f32(x).to_f32() == x),
        "{name}: the saved model weights are the bf16 ones"
    );

    let split = run_dir("bf16-split");
    let mut o = bf16.to_vec();
    o.push("max_steps=2");
    run(None, &small(&o), Some(&split), false, false).unwrap();
    run(
        None,
        &["max_steps=4".to_string()],
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
