//! The CPU backend against PyTorch on the same model and input, in one run:
//! the random Qwen2.5-VL-shaped model of `benches/common` (one 448x448
//! image, 512 tokens, the last 128 the response) through the engine's
//! forward, and forward + backward of the sum of the response log-probs;
//! then the same checkpoint and input through transformers
//! (`scripts/bench_cpu_torch.py`), with the Python of the fixture venv
//! (`.venv-ref/`, or `$VPPO_TORCH_PYTHON`). Without torch the PyTorch column
//! says why it is missing. `cargo bench --bench cpu_vs_torch` (set
//! RAYON_NUM_THREADS to pin the thread count; torch gets the same count).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use vppo_engine::model::acts::Save;
use vppo_engine::model::params::Tensors;
use vppo_engine::model::{Qwen25Vl, SequenceInput, TrainSequence};
use vppo_engine::safetensors_io::{write_atomic, OwnedTensor};

const RUNS: usize = 3;
const RESPONSE: usize = 128;

fn median_seconds(mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// A Hub-layout config.json for the bench model (what transformers reads).
fn hub_config(model: &Qwen25Vl) -> serde_json::Value {
    let (tc, vc, t) = (
        &model.config.text,
        &model.config.vision,
        &model.config.tokens,
    );
    serde_json::json!({
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": t.image_token_id,
        "video_token_id": t.video_token_id,
        "vision_start_token_id": t.vision_start_token_id,
        "vision_end_token_id": t.vision_end_token_id,
        "hidden_act": "silu",
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "max_position_embeddings": 32768,
        "num_attention_heads": tc.num_heads,
        "num_hidden_layers": tc.num_layers,
        "num_key_value_heads": tc.num_kv_heads,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_theta": tc.rope_theta,
        "tie_word_embeddings": tc.tie_word_embeddings,
        "torch_dtype": "float32",
        "use_sliding_window": false,
        "vocab_size": tc.vocab_size,
        "rope_scaling": {"type": "mrope", "mrope_section": tc.mrope_section},
        "vision_config": {
            "depth": vc.depth,
            "hidden_act": "silu",
            "hidden_size": vc.hidden_size,
            "intermediate_size": vc.intermediate_size,
            "num_heads": vc.num_heads,
            "in_chans": vc.in_channels,
            "out_hidden_size": vc.out_hidden_size,
            "patch_size": vc.patch_size,
            "spatial_merge_size": vc.spatial_merge_size,
            "temporal_patch_size": vc.temporal_patch_size,
            "window_size": vc.window_size,
            "fullatt_block_indexes": vc.fullatt_block_indexes,
            "tokens_per_second": 2
        }
    })
}

/// Writes the model as a checkpoint directory and the input as a
/// safetensors file, for the PyTorch side.
fn write_for_torch(model: &Qwen25Vl, input: &SequenceInput, dir: &Path) -> PathBuf {
    let cfg = serde_json::to_string_pretty(&hub_config(model)).unwrap();
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let tensors: Vec<OwnedTensor> = model
        .layout
        .specs
        .iter()
        .zip(&model.weights.0)
        .map(|(spec, w)| OwnedTensor::f32(&model.names.file_name(&spec.name), &spec.shape, w))
        .collect();
    write_atomic(&dir.join("model.safetensors"), &tensors).unwrap();
    let ids: Vec<i64> = input.ids.iter().map(|&v| v as i64).collect();
    let grid: Vec<i64> = input.grids.iter().flatten().map(|&v| v as i64).collect();
    let patch_dim = model.config.vision.patch_dim();
    let prompt_len = [(input.ids.len() - RESPONSE) as i64];
    let path = dir.join("input.safetensors");
    write_atomic(
        &path,
        &[
            OwnedTensor::i64("input_ids", &[ids.len()], &ids),
            OwnedTensor::f32(
                "pixel_values",
                &[input.pixel_values.len() / patch_dim, patch_dim],
                &input.pixel_values,
            ),
            OwnedTensor::i64("image_grid_thw", &[input.grids.len(), 3], &grid),
            OwnedTensor::i64("prompt_len", &[1], &prompt_len),
        ],
    )
    .unwrap();
    path
}

/// The Python that has torch: `$VPPO_TORCH_PYTHON`, else the fixture venv.
fn torch_python() -> Result<PathBuf, String> {
    let py = std::env::var_os("VPPO_TORCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-ref/bin/python"));
    if !py.exists() {
        return Err(format!(
            "no {} (create the fixture venv, scripts/fixtures/README.md, or set VPPO_TORCH_PYTHON)",
            py.display()
        ));
    }
    Ok(py)
}

fn torch_times(
    model: &Qwen25Vl,
    input: &SequenceInput,
    threads: usize,
) -> Result<(f64, f64, String), String> {
    let py = torch_python()?;
    let dir = std::env::temp_dir().join(format!("vppo-cpu-vs-torch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let input_path = write_for_torch(model, input, &dir);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench_cpu_torch.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(&dir)
        .arg(&input_path)
        .args([
            "--threads",
            &threads.to_string(),
            "--runs",
            &RUNS.to_string(),
        ])
        .output()
        .map_err(|e| format!("{}: {e}", py.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("no message").to_string();
        return Err(format!("{} failed: {last}", script.display()));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = line
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("unreadable output: {line}"))?;
    let f = |k: &str| json[k].as_f64().ok_or_else(|| format!("no {k} in {json}"));
    Ok((
        f("fwd_s")?,
        f("fwd_bwd_s")?,
        format!("torch {}", json["torch"]),
    ))
}

fn main() {
    let model = common::small_model();
    let input = common::small_input();
    let t = input.ids.len();
    let threads = rayon::current_num_threads();
    println!(
        "cpu vs torch: {:.0}M params, {threads} threads, {t} tokens ({RESPONSE} response), median of {RUNS}",
        model.layout.numel() as f64 / 1e6
    );
    let batch = [TrainSequence {
        input: input.clone(),
        prompt_len: t - RESPONSE,
    }];
    let fwd = median_seconds(|| {
        model.forward(&input).unwrap();
    });
    let mut grads = Tensors::zeros(&model.layout);
    let fwd_bwd = median_seconds(|| {
        let f = model.train_forward(&batch, Save::All).unwrap();
        let n = f.logprobs.len();
        model
            .train_backward(&f, &vec![1.0; n], &vec![0.0; n], &mut grads)
            .unwrap();
    });
    println!(
        "{:<28} {:>10} {:>10} {:>12}",
        "", "engine", "torch", "torch/engine"
    );
    match torch_times(&model, &input, threads) {
        Ok((t_fwd, t_fwd_bwd, version)) => {
            for (label, e, p) in [
                ("forward", fwd, t_fwd),
                ("forward + backward", fwd_bwd, t_fwd_bwd),
            ] {
                println!("{label:<28} {e:>9.2}s {p:>9.2}s {:>11.2}x", p / e);
            }
            println!("({version}, SDPA attention, fp32; >1x: the engine is faster)");
        }
        Err(why) => {
            println!("{:<28} {fwd:>9.2}s {:>10}", "forward", "-");
            println!("{:<28} {fwd_bwd:>9.2}s {:>10}", "forward + backward", "-");
            println!("torch: SKIPPED ({why})");
        }
    }
}
