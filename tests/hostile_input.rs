//! What a hostile but fair new user tries (issue 18): every bad input is a
//! clear error (never a panic), no command deletes, truncates or replaces
//! anything it did not create, and nothing trains on or saves NaN.
//!
//! Data-loss cases compare a snapshot of every file (path and bytes) before
//! and after the command.

mod common;

use common::fixtures::case_dir;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use vppo_engine::pipeline::{Pipeline, PipelineError};
use vppo_engine::train::config::TrainConfig;
use vppo_engine::train::run::{run, CONFIG_FILE};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vppo-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .args(args)
        .output()
        .expect("run vppo-engine")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A refused command: exit status 1 (an error, not a panic's 101 or an
/// abort's 134), with `needle` in the message.
fn assert_refused(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    assert!(
        stderr(o).contains(needle),
        "wanted {needle:?} in: {}",
        stderr(o)
    );
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A copy of the small fixture model at `dst`.
fn model_copy(dst: &Path) -> PathBuf {
    copy_dir(&case_dir("single_noresize"), dst);
    dst.to_path_buf()
}

fn edit_config(model: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = model.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
}

/// Sets element 0 of tensor `name` (an F32 tensor) of `model` to `value`.
fn poison_weight(model: &Path, name: &str, value: f32) {
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == name)
        .expect("tensor in fixture");
    assert_eq!(t.1, safetensors::Dtype::F32);
    t.3[..4].copy_from_slice(&value.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn jsonl(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

// ---------------------------------------------------------------- outputs

#[test]
fn eval_never_overwrites_its_inputs_or_a_previous_result() {
    let dir = scratch("eval-out");
    let model = model_copy(&dir.join("m"));
    let data = dir.join("g.jsonl");
    jsonl(
        &data,
        &[serde_json::json!({"problem": "1+1?", "answer": "2"})],
    );
    let results = dir.join("results.jsonl");
    std::fs::write(&results, "an earlier run's results\n").unwrap();
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let before = snapshot(&dir);
    let m = model.to_str().unwrap();
    let d = data.to_str().unwrap();
    let base = ["eval", "--model", m, "--n", "1", "--max-new-tokens", "2"];
    let same = dir.join("sub/../g.jsonl");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for out in [d, same.to_str().unwrap()] {
        let o = bin(&[&base[..], &["--data", d, "--out", out]].concat());
        assert_refused(&o, "also an input");
    }
    let cfg = model.join("config.json");
    let o = bin(&[&base[..], &["--data", d, "--out", cfg.to_str().unwrap()]].concat());
    assert_refused(&o, "also an input");
    // A run that fails (nothing to evaluate) leaves an existing --out as it was.
    let o = bin(&[
        &base[..],
        &[
            "--data",
            empty.to_str().unwrap(),
            "--out",
            results.to_str().unwrap(),
        ],
    ]
    .concat());
    assert_refused(&o, "no usable problem");
    std::fs::remove_dir_all(dir.join("sub")).unwrap();
    assert_eq!(snapshot(&dir), before, "nothing changed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn convert_writes_only_into_a_new_or_empty_directory() {
    let dir = scratch("convert");
    let model = model_copy(&dir.join("p/m"));
    std::fs::write(dir.join("p/m/photo.png"), b"not the model's").unwrap();
    std::fs::create_dir_all(dir.join("p/m/extra")).unwrap();
    std::fs::write(dir.join("p/m/extra/notes.md"), b"mine").unwrap();
    let user = dir.join("user");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("thesis.tex"), b"years of work").unwrap();
    let before = snapshot(&dir);
    let m = model.to_str().unwrap();
    for (out, needle) in [
        (dir.join("p"), "would replace"),
        (model.clone(), "would replace"),
        (user.clone(), "not empty"),
    ] {
        let o = bin(&["convert", "--model", m, "--out", out.to_str().unwrap()]);
        assert_refused(&o, needle);
    }
    assert_eq!(snapshot(&dir), before, "nothing deleted or changed");
    // A new directory and an existing empty one are fine.
    let fresh = dir.join("fresh");
    let o = bin(&["convert", "--model", m, "--out", fresh.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fresh.join("model.safetensors").is_file());
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = bin(&["convert", "--model", m, "--out", empty.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn score_never_writes_over_its_inputs() {
    let dir = scratch("score-out");
    let model = model_copy(&dir.join("m"));
    let image = model.join("img0.png");
    let before = snapshot(&dir);
    let m = model.to_str().unwrap();
    let base = [
        "score",
        "--model",
        m,
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "What is it?",
        "--response",
        "A dot.",
        "--device",
        "cpu",
    ];
    let weights = model.join("model.safetensors");
    for out in [&image, &weights] {
        let o = bin(&[&base[..], &["--out", out.to_str().unwrap()]].concat());
        assert_refused(&o, "also an input");
    }
    let out = dir.join("s.safetensors");
    let o = bin(&[
        &base[..],
        &[
            "--out",
            out.to_str().unwrap(),
            "--grad-out",
            out.to_str().unwrap(),
        ],
    ]
    .concat());
    assert_refused(&o, "--grad-out");
    assert_eq!(snapshot(&dir), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_writes_only_into_a_new_or_empty_run_directory() {
    let dir = scratch("train-out");
    let user = dir.join("plots");
    std::fs::create_dir_all(&user).unwrap();
    std::fs::write(user.join("reward.png"), b"my own plot").unwrap();
    let before = snapshot(&dir);
    let err = run(None, &["max_steps=1".into()], Some(&user), false, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not empty") && err.contains("reward.png"),
        "{err}"
    );
    // The model directory is not a run directory either.
    let model = model_copy(&dir.join("m"));
    let before_model = snapshot(&dir);
    let err = run(
        None,
        &[
            format!("model={:?}", model.display().to_string()),
            "max_steps=1".into(),
        ],
        Some(&model),
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("would replace"), "{err}");
    assert_eq!(snapshot(&dir), before_model);
    std::fs::remove_dir_all(&model).unwrap();
    assert_eq!(snapshot(&dir), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A run directory as a run leaves it before its first checkpoint is
/// complete, plus whatever the test adds.
fn fake_run(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = TrainConfig::resolve(None, &["max_steps=1".into()]).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), cfg.to_toml()).unwrap();
}

#[test]
fn resume_without_latest_keeps_the_checkpoints_and_says_how_to_fix_it() {
    let dir = scratch("no-latest");
    fake_run(&dir);
    std::fs::create_dir_all(dir.join("checkpoint-00000002")).unwrap();
    std::fs::write(dir.join("checkpoint-00000002/model.safetensors"), b"w").unwrap();
    let before = snapshot(&dir);
    let err = run(None, &[], Some(&dir), true, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("latest is missing") && err.contains("checkpoint-00000002"),
        "{err}"
    );
    assert_eq!(snapshot(&dir), before);
    // An empty `latest` names the file, not some config.json.
    std::fs::write(dir.join("latest"), "").unwrap();
    let err = run(None, &[], Some(&dir), true, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("latest") && err.contains("empty"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_runs_in_one_directory_are_refused() {
    let dir = scratch("lock");
    fake_run(&dir);
    // This process holds the lock, as a concurrent `train` would.
    let lock = dir.join(vppo_engine::train::run_dir::LOCK_FILE);
    std::fs::write(&lock, std::process::id().to_string()).unwrap();
    let before = snapshot(&dir);
    let err = run(None, &[], Some(&dir), true, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use by another"), "{err}");
    assert_eq!(snapshot(&dir), before);
    let fresh = scratch("lock-fresh");
    std::fs::write(
        fresh.join(vppo_engine::train::run_dir::LOCK_FILE),
        std::process::id().to_string(),
    )
    .unwrap();
    let err = run(None, &["max_steps=1".into()], Some(&fresh), false, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use by another"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&fresh).unwrap();
}

/// keep_checkpoints across a resume (the resumed model's own checkpoint is
/// among those pruned), and the leftovers of interrupted saves removed.
#[test]
fn a_resumed_run_prunes_checkpoints_and_removes_leftovers() {
    let dir = scratch("keep").join("run");
    let small = |extra: &[&str]| -> Vec<String> {
        let mut o: Vec<String> = [
            "warmup_steps=60",
            "warmup_batch=16",
            "rollout_batch=2",
            "mini_batch=1",
            "group_size=4",
            "save_every=1",
            "keep_checkpoints=2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        o.extend(extra.iter().map(|s| s.to_string()));
        o
    };
    run(None, &small(&["max_steps=2"]), Some(&dir), false, false).unwrap();
    let leftover = dir.join(".checkpoint-00000003.tmp-999999");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("model.safetensors"), b"half").unwrap();
    std::fs::write(dir.join(".latest.tmp-999999"), "checkpoint-").unwrap();
    let summary = run(None, &small(&["max_steps=6"]), Some(&dir), true, false).unwrap();
    assert_eq!(summary.steps, 6);
    assert!(!leftover.exists() && !dir.join(".latest.tmp-999999").exists());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    // Two updates per rollout batch: saves at steps 4 and 6, and the best
    // validation's checkpoint wherever it is. When that is not 2, the save
    // at 6 reads the model's files from 4, since 2 (the resumed one) is gone.
    let mut want = vec![
        "checkpoint-00000004".to_string(),
        "checkpoint-00000006".into(),
    ];
    let best = vppo_engine::train::retention::best_checkpoint(&dir).expect("validated");
    let best = best.file_name().unwrap().to_string_lossy().into_owned();
    if !want.contains(&best) {
        want.insert(0, best);
    }
    assert_eq!(names, want);
    assert!(!dir.join(vppo_engine::train::run_dir::LOCK_FILE).exists());
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

// ------------------------------------------------------- values and panics

#[test]
fn out_of_range_train_settings_are_errors_not_panics_and_write_nothing() {
    let dir = scratch("train-values");
    for setting in [
        "clip_low=1.5",
        "clip_high=-1",
        "lr=nan",
        "lr=inf",
        "lr=-1",
        "entropy_penalty=nan",
        "weight_decay=-5",
        "beta1=2",
        "beta2=1.0",
        "clip_dual=0.5",
        "tas_beta_min=2",
        "max_grad_norm=nan",
        "max_grad_norm=0",
        "warmup_lr=nan",
        "warmup_batch=0",
        "temperature=nan",
        "top_p=nan",
        "max_steps=0",
    ] {
        let out = dir.join("run");
        let o = bin(&["train", "--quiet", "--out", out.to_str().unwrap(), setting]);
        let field = setting.split('=').next().unwrap();
        assert_refused(&o, field);
        assert!(
            stderr(&o).contains("must be") || stderr(&o).contains("at least"),
            "{setting}: the allowed range is given: {}",
            stderr(&o)
        );
        assert!(!out.exists(), "{setting}: nothing written");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn out_of_range_sampling_options_are_refused_with_their_range() {
    let generate = ["generate", "--model", "/no/model", "--prompt", "x"];
    let eval = ["eval", "--model", "/no/model", "--data", "d.jsonl"];
    let convert = ["convert", "--model", "/no/model", "--out", "o"];
    for (base, flag, value, needle) in [
        (&generate[..], "--temperature", "nan", "[0, 100]"),
        (&generate[..], "--temperature", "inf", "[0, 100]"),
        (&generate[..], "--temperature=-1", "", "[0, 100]"),
        (&generate[..], "--top-p", "0", "(0, 1]"),
        (&generate[..], "--max-new-tokens", "0", "at least 1"),
        (&generate[..], "--n", "0", "at least 1"),
        (&generate[..], "--max-num-seqs", "0", "at least 1"),
        (&generate[..], "--max-num-batched-tokens", "0", "at least 1"),
        (&generate[..], "--kv-cache-memory-fraction", "1.5", "[0, 1]"),
        (&eval[..], "--temperature", "nan", "[0, 100]"),
        (&eval[..], "--n", "0", "at least 1"),
        (&eval[..], "--batch", "0", "at least 1"),
        (&eval[..], "--limit", "0", "at least 1"),
        (&eval[..], "--max-new-tokens", "0", "at least 1"),
        (&convert[..], "--max-shard-mib", "0", "at least 1"),
    ] {
        let mut args = [base, &[flag]].concat();
        if !value.is_empty() {
            args.push(value);
        }
        let o = bin(&args);
        // clap's usage error (exit 2), before any file is opened.
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

// -------------------------------------------------------------- NaN weights

#[test]
fn non_finite_weights_are_refused_at_load_naming_the_tensor() {
    let dir = scratch("nan-weights");
    for (name, value) in [
        ("visual.patch_embed.proj.weight", f32::NAN),
        ("lm_head.weight", f32::INFINITY),
    ] {
        let model = model_copy(&dir.join("m"));
        poison_weight(&model, name, value);
        let err = Pipeline::load(&model).err().expect("refused").to_string();
        assert!(
            err.contains(name) && err.contains("model.safetensors"),
            "{err}"
        );
        let out = dir.join("s.safetensors");
        let o = bin(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "--response",
            "ok",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_refused(&o, name);
        assert!(!out.exists());
        // Training from it fails before anything trains or is saved.
        let data = dir.join("d.jsonl");
        jsonl(
            &data,
            &[serde_json::json!({"problem": "1+1?", "answer": "2"})],
        );
        let run_dir = dir.join("run");
        let err = run(
            None,
            &[
                format!("model={:?}", model.display().to_string()),
                format!("data={:?}", data.display().to_string()),
            ],
            Some(&run_dir),
            false,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(name), "{err}");
        assert!(!run_dir.join("latest").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ------------------------------------------------------ empty or bad input

/// A parquet file with the problem and answer columns and no rows.
fn empty_parquet(path: &Path) {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new("problem", DataType::Utf8, true),
        Field::new("answer", DataType::Utf8, true),
    ]));
    let none: Vec<Option<&str>> = Vec::new();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(none.clone())) as ArrayRef,
            Arc::new(StringArray::from(none)) as ArrayRef,
        ],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn training_or_evaluating_on_nothing_is_an_error() {
    let dir = scratch("empty-data");
    let model = case_dir("single_noresize");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let blank = dir.join("blank.jsonl");
    std::fs::write(&blank, "\n  \n\n").unwrap();
    let zero_rows = dir.join("zero.parquet");
    empty_parquet(&zero_rows);
    let bad = dir.join("bad.jsonl");
    jsonl(
        &bad,
        &[
            serde_json::json!({"problem": "no answer"}),
            serde_json::json!({"problem": "<image>x", "answer": "1", "images": ["gone.png"]}),
        ],
    );
    for (data, needle) in [
        (&empty, "no rows"),
        (&blank, "no rows"),
        (&zero_rows, "no rows"),
        (&bad, "no usable row"),
    ] {
        let run_dir = dir.join("run");
        let err = run(
            None,
            &[
                format!("model={:?}", model.display().to_string()),
                format!("data={:?}", data.display().to_string()),
                "epochs=3".into(),
                "max_response_tokens=2".into(),
            ],
            Some(&run_dir),
            false,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(needle), "{}: {err}", data.display());
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    let m = model.to_str().unwrap();
    for (data, extra) in [
        (&empty, None),
        (&blank, None),
        (&zero_rows, None),
        (&bad, None),
        (&blank, Some("nope")),
    ] {
        let good = dir.join("good.jsonl");
        jsonl(
            &good,
            &[serde_json::json!({"problem": "1+1?", "answer": "2"})],
        );
        let data = if extra.is_some() { &good } else { data };
        let mut args = vec!["eval", "--model", m, "--data", data.to_str().unwrap()];
        args.extend(["--n", "1", "--max-new-tokens", "1", "--device", "cpu"]);
        if let Some(col) = extra {
            args.extend(["--answer-column", col]);
        }
        let o = bin(&args);
        assert_refused(&o, "no usable problem");
        if extra.is_some() {
            assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let dir = scratch("context");
    let model = model_copy(&dir.join("m"));
    edit_config(&model, |c| c["max_position_embeddings"] = 64.into());
    let p = Pipeline::load(&model).unwrap();
    assert!(p.prompt_input(&[], "hi").is_ok(), "a short prompt fits");
    let long = "word ".repeat(200);
    match p.prompt_input(&[], &long) {
        Err(PipelineError::PromptTooLong {
            tokens, context, ..
        }) => {
            assert!(tokens > 64 && context == 64)
        }
        other => panic!(
            "expected PromptTooLong, got {:?}",
            other.map(|i| i.ids.len())
        ),
    }
    let err = p.prepare(&[], "hi", &long).unwrap_err().to_string();
    assert!(
        err.contains("context of 64") && err.contains("config.json"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_image_token_id_the_tokenizer_does_not_have_is_named() {
    let dir = scratch("image-token");
    let model = model_copy(&dir.join("m"));
    edit_config(&model, |c| c["image_token_id"] = 100_000.into());
    let err = Pipeline::load(&model).err().expect("refused").to_string();
    assert!(
        err.contains("config.json") && err.contains("image_token_id"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_jpeg_cut_in_half_is_refused_like_pillow_does() {
    use vppo_engine::processor::image::RgbImage;
    // Busy pixels, so that most of the file is the entropy-coded scan.
    let img = image::RgbImage::from_fn(256, 192, |x, y| {
        let h = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) >> 7;
        image::Rgb([h as u8, (h >> 8) as u8, (x + y) as u8])
    });
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let name = Path::new("photo.jpg");
    assert!(
        RgbImage::decode(&jpeg, name).is_ok(),
        "the whole file decodes"
    );
    for cut in [jpeg.len() / 2, jpeg.len() - 2] {
        let err = RgbImage::decode(&jpeg[..cut], name)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("truncated") && err.contains("photo.jpg"),
            "{err}"
        );
    }
    // The sibling: a PNG cut in half.
    let png = std::fs::read(case_dir("single_noresize").join("img0.png")).unwrap();
    assert!(RgbImage::decode(&png[..png.len() / 2], Path::new("a.png")).is_err());
}

#[test]
fn quiet_still_reports_skipped_rows() {
    let dir = scratch("quiet");
    let data = dir.join("d.jsonl");
    jsonl(
        &data,
        &[
            serde_json::json!({"problem": "1+1?", "answer": "2"}),
            serde_json::json!({"problem": "no answer"}),
        ],
    );
    let model = case_dir("single_noresize");
    let out = dir.join("run");
    let o = bin(&[
        "train",
        "--quiet",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--algo",
        "grpo",
        "--device",
        "cpu",
        "rollout_batch=1",
        "mini_batch=1",
        "group_size=2",
        "epochs=2",
        "max_response_tokens=2",
        "bf16=false",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("skipped rows: 1 corrupt"),
        "one bad row over two epochs, shown under --quiet: {}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Sets every element of tensor `name` to +-3e38: finite weights whose
/// logits overflow, so log-probs, the loss and the gradients are NaN.
fn overflow_weight(model: &Path, name: &str) {
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let mut data = t.data().to_vec();
            if n == name {
                for (k, v) in data.chunks_exact_mut(4).enumerate() {
                    let x: f32 = if k % 2 == 0 { 3e38 } else { -3e38 };
                    v.copy_from_slice(&x.to_le_bytes());
                }
            }
            (n, t.dtype(), t.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Updates with a non-finite loss are skipped and counted in the metrics;
/// three in a row stop the run with a clear error; every checkpoint written
/// holds finite weights and loads. `score` and `generate` refuse to report
/// NaN log-probs.
#[test]
fn a_run_whose_loss_is_nan_skips_its_updates_and_stops() {
    use vppo_engine::train::checkpoint::{latest_checkpoint, load_training_checkpoint};
    use vppo_engine::train::metrics::read_metrics;
    use vppo_engine::train::run::{MAX_SKIPPED_IN_A_ROW, METRICS_FILE};
    let dir = scratch("diverge");
    let model = model_copy(&dir.join("m"));
    overflow_weight(&model, "lm_head.weight");
    let data = dir.join("d.jsonl");
    jsonl(
        &data,
        &[
            serde_json::json!({"problem": "1+1?", "answer": "2"}),
            serde_json::json!({"problem": "2+2?", "answer": "4"}),
        ],
    );
    let out = dir.join("run");
    let settings: Vec<String> = [
        format!("model={:?}", model.display().to_string()),
        format!("data={:?}", data.display().to_string()),
        "algo=grpo".into(),
        "device=cpu".into(),
        "rollout_batch=1".into(),
        "mini_batch=1".into(),
        "group_size=2".into(),
        "epochs=5".into(),
        "max_response_tokens=2".into(),
        "bf16=false".into(),
        "save_every=1".into(),
    ]
    .to_vec();
    let err = run(None, &settings, Some(&out), false, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{MAX_SKIPPED_IN_A_ROW} updates in a row")),
        "{err}"
    );
    let metrics = read_metrics(&out.join(METRICS_FILE)).unwrap();
    assert_eq!(metrics.len() as u64, MAX_SKIPPED_IN_A_ROW);
    for (k, m) in metrics.iter().enumerate() {
        assert!(m.loss.is_nan(), "step {}: {}", m.step, m.loss);
        assert_eq!(m.skipped_steps, k as u64 + 1);
    }
    let latest = latest_checkpoint(&out).unwrap().expect("a checkpoint");
    let (saved, _, _) = load_training_checkpoint(&latest).unwrap();
    let original = vppo_engine::model::Qwen25Vl::load(&model).unwrap();
    assert_eq!(saved.weights.0, original.weights.0, "no update applied");

    let m = model.to_str().unwrap();
    let score_out = dir.join("s.safetensors");
    let o = bin(&[
        "score",
        "--model",
        m,
        "--prompt",
        "hi",
        "--response",
        "ok",
        "--device",
        "cpu",
        "--out",
        score_out.to_str().unwrap(),
    ]);
    assert_refused(&o, "non-finite log-prob");
    assert!(!score_out.exists());
    let o = bin(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]);
    assert_refused(&o, "non-finite log-probs");
    std::fs::remove_dir_all(&dir).unwrap();
}
