//! `score` end to end (images and text in, safetensors out) on the fixtures,
//! a bf16 Hub-style sharded checkpoint, and every bad-input case with the
//! error message a user sees.

mod common;

use common::fixtures::{case_dir, inputs, max_abs_diff, Reference, CASES};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use vppo_engine::pipeline::Pipeline;

/// A scratch copy of a fixture case.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(case: &str, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vppo-score-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(case_dir(case)).unwrap().flatten() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        Scratch(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The case's prompt with `<image>` where its images go.
fn prompt_with_placeholders(case: &str) -> String {
    let inp = inputs(case);
    let mut text = String::new();
    for item in inp["messages"][0]["content"].as_array().unwrap() {
        match item["type"].as_str().unwrap() {
            "image" => text.push_str("<image>"),
            _ => text.push_str(item["text"].as_str().unwrap()),
        }
    }
    text
}

fn images_of(case: &str, dir: &Path) -> Vec<PathBuf> {
    inputs(case)["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| dir.join(v.as_str().unwrap()))
        .collect()
}

#[test]
fn score_matches_transformers_from_raw_inputs() {
    for case in CASES {
        let dir = case_dir(case);
        let scorer = Pipeline::load(&dir).unwrap();
        let response = inputs(case)["response"].as_str().unwrap().to_string();
        let scored = scorer
            .score(
                &images_of(case, &dir),
                &prompt_with_placeholders(case),
                &response,
            )
            .unwrap();
        let r = Reference::open(case, "reference.safetensors");
        let want_ids: Vec<u32> = r.i64("input_ids").1.iter().map(|&v| v as u32).collect();
        assert_eq!(scored.input_ids, want_ids, "{case}: input ids");
        let d_lp = max_abs_diff(&scored.response_logprobs, &r.f32("response_logprobs").1);
        let d_logits = max_abs_diff(&scored.response_logits, &r.f32("response_logits").1);
        println!("{case}: logprobs {d_lp:.2e} logits {d_logits:.2e}");
        assert!(
            d_lp < 1e-4 && d_logits < 1e-4,
            "{case}: logprobs {d_lp}, logits {d_logits}"
        );
    }
}

fn run_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_writes_the_documented_tensors() {
    let case = "single_noresize";
    let dir = case_dir(case);
    let out =
        std::env::temp_dir().join(format!("vppo-score-cli-{}.safetensors", std::process::id()));
    let img = images_of(case, &dir)[0].display().to_string();
    let response = inputs(case)["response"].as_str().unwrap().to_string();
    let prompt = prompt_with_placeholders(case);
    let grad_out = out.with_extension("grads.safetensors");
    let (ok, stderr) = run_cli(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        &img,
        "--prompt",
        &prompt,
        "--response",
        &response,
        "--out",
        out.to_str().unwrap(),
        "--grad-out",
        grad_out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    // The default device is `auto`; --grad-out needs the CPU backward, so
    // auto picks the CPU even where a GPU is usable.
    assert!(stderr.contains("on Cpu"), "{stderr}");
    // --grad-out: every tensor of the checkpoint, torch's gradient of sum(log-probs).
    let grad_bytes = std::fs::read(&grad_out).unwrap();
    std::fs::remove_file(&grad_out).unwrap();
    let grads = SafeTensors::deserialize(&grad_bytes).unwrap();
    let torch = Reference::open(case, "grads.safetensors");
    assert_eq!(grads.len(), torch.names().len());
    for name in torch.names() {
        let t = grads.tensor(&name).unwrap();
        let got: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let (shape, want) = torch.f32(&name);
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        assert!(max_abs_diff(&got, &want) / scale < 1e-4, "{name}");
    }
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let r = Reference::open(case, "reference.safetensors");
    let ids = st.tensor("input_ids").unwrap();
    assert_eq!(ids.dtype(), Dtype::I64);
    assert_eq!(ids.shape(), r.i64("input_ids").0.as_slice());
    let lp = st.tensor("response_logprobs").unwrap();
    let logits = st.tensor("response_logits").unwrap();
    assert_eq!(lp.dtype(), Dtype::F32);
    assert_eq!(logits.shape(), r.f32("response_logits").0.as_slice());
    let got: Vec<f32> = lp
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert!(max_abs_diff(&got, &r.f32("response_logprobs").1) < 1e-4);
}

/// name -> (dtype, shape, bytes) of every tensor in a file.
type TensorMap = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;
/// (name, shape, bytes) of the tensors of one shard.
type Shard = Vec<(String, Vec<usize>, Vec<u8>)>;

/// Rewrites a checkpoint file through `edit` (name -> (dtype, shape, bytes)).
fn rewrite(path: &Path, edit: impl FnOnce(&mut TensorMap)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut map: TensorMap = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<(String, TensorView)> = map
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn bf16_sharded_hub_checkpoint_scores_close_to_fp32() {
    // Lay single_noresize out like a Hub download: bf16, two shards + index.
    let case = "single_noresize";
    let s = Scratch::copy_of(case, "bf16");
    let src = s.path().join("model.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    let mut shards: [Shard; 2] = [Vec::new(), Vec::new()];
    for (i, name) in names.iter().enumerate() {
        let t = st.tensor(name).unwrap();
        let bf: Vec<u8> = t
            .data()
            .chunks_exact(4)
            .flat_map(|b| {
                half::bf16::from_f32(f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes()
            })
            .collect();
        let shard = i % 2;
        weight_map.insert(
            name.clone(),
            format!("model-0000{}-of-00002.safetensors", shard + 1).into(),
        );
        shards[shard].push((name.clone(), t.shape().to_vec(), bf));
    }
    drop(st);
    std::fs::remove_file(&src).unwrap();
    for (k, shard) in shards.iter().enumerate() {
        let views: Vec<(String, TensorView)> = shard
            .iter()
            .map(|(n, shape, b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::BF16, shape.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::tensor::serialize_to_file(
            views,
            None,
            &s.path()
                .join(format!("model-0000{}-of-00002.safetensors", k + 1)),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        s.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let scorer = Pipeline::load(s.path()).unwrap();
    let response = inputs(case)["response"].as_str().unwrap().to_string();
    let scored = scorer
        .score(
            &images_of(case, s.path()),
            &prompt_with_placeholders(case),
            &response,
        )
        .unwrap();
    let want = Reference::open(case, "reference.safetensors")
        .f32("response_logprobs")
        .1;
    let d = max_abs_diff(&scored.response_logprobs, &want);
    println!("bf16 weights vs fp32 reference: max abs log-prob diff {d:.3e}");
    // bf16 weights change the log-probs a little, never wildly.
    assert!(d > 0.0 && d < 0.1, "bf16 log-prob diff {d}");
}

/// Loads a broken checkpoint and returns the error text.
fn load_error(dir: &Path) -> String {
    match Pipeline::load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_checkpoints_give_errors_naming_the_file_and_problem() {
    let missing = std::env::temp_dir().join("vppo-no-such-checkpoint");
    let err = load_error(&missing);
    assert!(
        err.contains("vppo-no-such-checkpoint") && err.contains("does not exist"),
        "{err}"
    );

    let s = Scratch::copy_of("single_noresize", "noconfig");
    std::fs::remove_file(s.path().join("config.json")).unwrap();
    let err = load_error(s.path());
    assert!(
        err.contains("config.json") && err.contains("cannot read"),
        "{err}"
    );

    let s = Scratch::copy_of("single_noresize", "badjson");
    std::fs::write(s.path().join("config.json"), "{ not json").unwrap();
    let err = load_error(s.path());
    assert!(
        err.contains("config.json") && err.contains("not valid JSON"),
        "{err}"
    );

    let s = Scratch::copy_of("single_noresize", "nofield");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path().join("config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(s.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_error(s.path());
    assert!(
        err.contains("config.json") && err.contains("`hidden_size`"),
        "{err}"
    );

    let s = Scratch::copy_of("single_noresize", "noweights");
    std::fs::remove_file(s.path().join("model.safetensors")).unwrap();
    let err = load_error(s.path());
    assert!(err.contains("no model.safetensors"), "{err}");

    let s = Scratch::copy_of("single_noresize", "corrupt");
    std::fs::write(
        s.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": broken}   ",
    )
    .unwrap();
    let err = load_error(s.path());
    assert!(
        err.contains("model.safetensors") && err.contains("corrupt"),
        "{err}"
    );

    let s = Scratch::copy_of("single_noresize", "missingtensor");
    rewrite(&s.path().join("model.safetensors"), |m| {
        m.remove("model.norm.weight");
    });
    let err = load_error(s.path());
    assert!(
        err.contains("`model.norm.weight`") && err.contains("missing"),
        "{err}"
    );

    let s = Scratch::copy_of("single_noresize", "shape");
    rewrite(&s.path().join("model.safetensors"), |m| {
        let e = m.get_mut("model.norm.weight").unwrap();
        e.1 = vec![32];
        e.2.truncate(32 * 4);
    });
    let err = load_error(s.path());
    assert!(
        err.contains("`model.norm.weight`")
            && err.contains("[32]")
            && err.contains("expected [64]"),
        "{err}"
    );

    let s = Scratch::copy_of("single_noresize", "dtype");
    rewrite(&s.path().join("model.safetensors"), |m| {
        let e = m.get_mut("model.norm.weight").unwrap();
        e.0 = Dtype::I32;
    });
    let err = load_error(s.path());
    assert!(
        err.contains("`model.norm.weight`") && err.contains("I32"),
        "{err}"
    );

    let s = Scratch::copy_of("two_images", "shard");
    std::fs::remove_file(s.path().join("model-00002-of-00004.safetensors")).unwrap();
    let err = load_error(s.path());
    assert!(
        err.contains("model-00002-of-00004.safetensors") && err.contains("missing"),
        "{err}"
    );

    let s = Scratch::copy_of("single_noresize", "notok");
    std::fs::remove_file(s.path().join("tokenizer.json")).unwrap();
    let err = load_error(s.path());
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn bad_score_inputs_give_clear_errors() {
    let case = "single_noresize";
    let dir = case_dir(case);
    let scorer = Pipeline::load(&dir).unwrap();
    let img = images_of(case, &dir);
    let err = scorer
        .score(&img, "<image><image> two?", "yes")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("2 `<image>` placeholder(s) but 1 image(s)"),
        "{err}"
    );
    let err = scorer
        .score(&[dir.join("nope.png")], "x", "y")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope.png"), "{err}");
    let err = scorer
        .score(&[dir.join("config.json")], "x", "y")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("cannot decode"),
        "{err}"
    );
    let err = scorer.score(&img, "x", "").err().unwrap().to_string();
    assert!(err.contains("response is empty"), "{err}");
    // Outputs go to a scratch file: `--out /dev/null` must not be used here
    // (an older atomic writer renamed over it, replacing the device node).
    let out_dir = std::env::temp_dir().join(format!("vppo-score-cli-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("scores.safetensors");
    let out = out.to_str().unwrap();
    // The CLI prints the same message and fails; --device cuda without a
    // usable device (driver, kernels, cuBLAS) fails with a clear message.
    let (ok, stderr) = run_cli(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "x",
        "--response",
        "",
        "--out",
        out,
    ]);
    assert!(!ok && stderr.contains("response is empty"), "{stderr}");
    let (ok, stderr) = run_cli(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "x",
        "--response",
        "y",
        "--device",
        "cuda",
        "--out",
        out,
    ]);
    assert!(ok || stderr.contains("--device cuda"), "{stderr}");
    // `--device auto` (the default) falls back to the CPU without a usable GPU.
    let (ok, stderr) = run_cli(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "x",
        "--response",
        "y",
        "--device",
        "auto",
        "--out",
        out,
    ]);
    assert!(ok, "{stderr}");
    if !vppo_engine::backend::cuda::driver_present() {
        assert!(stderr.contains("on Cpu"), "{stderr}");
    }
    assert!(Path::new(out).is_file());
    std::fs::remove_dir_all(&out_dir).unwrap();
}
