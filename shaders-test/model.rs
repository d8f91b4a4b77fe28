//! The model's generic graph on the CUDA backend against the same graph on
//! the CPU backend (`Qwen25Vl::forward` / `score`) on the committed
//! fixtures, and the fixture loading the graph cases share.

use super::{check, cuda, Case};
use std::path::PathBuf;
use vppo_engine::backend::cuda::{blas_present, CudaBackend};
use vppo_engine::model::acts::Save;
use vppo_engine::model::engine::Engine;
use vppo_engine::model::plan::HostPlan;
use vppo_engine::model::{SequenceInput, TrainSequence};
use vppo_engine::ops::Backend;
use vppo_engine::pipeline::Pipeline;

/// fp32 parity of the whole forward (the GEMMs run without TF32).
const MODEL_TOL: f64 = 1e-4;

/// What a case reports when libcublas cannot be loaded (the GPU check
/// re-runs these cases with the pip wheels' library directory on
/// LD_LIBRARY_PATH).
pub(crate) const NO_CUBLAS: &str = "SKIPPED: libcublasLt/libcublas not loadable (LD_LIBRARY_PATH)";

/// The fixture directory, found at run time (the GPU machine runs the test
/// binary from a copy of the repository root).
pub(crate) fn fixture_dir(case: &str) -> PathBuf {
    let rel = PathBuf::from("tests/fixtures/qwen2_5_vl").join(case);
    let roots = [
        std::env::var("CARGO_MANIFEST_DIR").ok().map(PathBuf::from),
        std::env::current_dir().ok(),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    roots
        .into_iter()
        .flatten()
        .map(|r| r.join(&rel))
        .find(|p| p.join("config.json").is_file())
        .unwrap_or(rel)
}

/// The fixture's prompt with `<image>` where its images go, its image
/// paths and its response.
pub(crate) fn fixture_request(
    case: &str,
) -> Result<(PathBuf, String, Vec<PathBuf>, String), String> {
    let dir = fixture_dir(case);
    let text = std::fs::read_to_string(dir.join("inputs.json"))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let inp: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let mut prompt = String::new();
    for item in inp["messages"][0]["content"]
        .as_array()
        .ok_or("no messages")?
    {
        match item["type"].as_str() {
            Some("image") => prompt.push_str("<image>"),
            _ => prompt.push_str(item["text"].as_str().unwrap_or_default()),
        }
    }
    let images = inp["images"]
        .as_array()
        .ok_or("no images")?
        .iter()
        .map(|v| dir.join(v.as_str().unwrap_or_default()))
        .collect();
    let response = inp["response"].as_str().ok_or("no response")?.to_string();
    Ok((dir, prompt, images, response))
}

/// A fixture loaded for a model case: its checkpoint directory and
/// request, the pipeline, and the request prepared (prompt + response).
pub(crate) struct Prepared {
    pub dir: PathBuf,
    pub prompt: String,
    pub images: Vec<PathBuf>,
    pub response: String,
    pub pipe: Pipeline,
    pub input: SequenceInput,
    pub prompt_len: usize,
}

pub(crate) fn prepared(case: &str) -> Result<Prepared, String> {
    let (dir, prompt, images, response) = fixture_request(case)?;
    let pipe = Pipeline::load(&dir).map_err(|e| e.to_string())?;
    let (input, prompt_len) = pipe
        .prepare(&images, &prompt, &response)
        .map_err(|e| e.to_string())?;
    Ok(Prepared {
        dir,
        prompt,
        images,
        response,
        pipe,
        input,
        prompt_len,
    })
}

pub(crate) fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The generic graph on the CUDA backend vs the CPU backend: log-probs,
/// logits and final hidden states; a second forward repeats the result.
fn model_case(case: &'static str) -> Case {
    Case {
        name: format!("qwen2.5-vl graph forward on CUDA fixture {case} f32"),
        run: Box::new(move |_gpu, _rng| {
            if !blas_present() {
                return Ok(NO_CUBLAS.into());
            }
            let Prepared {
                prompt,
                images,
                response,
                pipe,
                input,
                prompt_len,
                ..
            } = prepared(case)?;
            let cpu_scored = pipe
                .score(&images, &prompt, &response)
                .map_err(|e| e.to_string())?;
            let cpu_fwd = pipe.model.forward(&input).map_err(|e| e.to_string())?;

            let gpu = CudaBackend::new(0).map_err(cuda)?;
            let dev = Engine::new(gpu, &pipe.model).map_err(|e| e.to_string())?;
            let seq = TrainSequence {
                input: input.clone(),
                prompt_len,
            };
            let (logprobs, logits) = dev.response_logits(&seq).map_err(|e| e.to_string())?;
            let plan = HostPlan::new(dev.config(), &input, None).map_err(|e| e.to_string())?;
            let pixels = dev
                .be
                .upload(&input.pixel_values)
                .map_err(|e| e.to_string())?;
            let fwd = dev
                .graph()
                .forward(&plan, &input.ids, Some(pixels), Save::Nothing, None)
                .map_err(|e| e.to_string())?;
            let hidden = dev.be.download(&fwd.hidden).map_err(|e| e.to_string())?;
            let e_lp = check(
                "logprobs",
                &logprobs,
                &cpu_scored.response_logprobs,
                MODEL_TOL,
            )?;
            let e_logits = check("logits", &logits, &cpu_scored.response_logits, MODEL_TOL)?;
            let e_h = check("hidden", &hidden, &cpu_fwd.hidden, MODEL_TOL)?;
            if plan.positions[0] != cpu_fwd.positions {
                return Err("M-RoPE positions differ".into());
            }
            let d_lp = max_abs(&logprobs, &cpu_scored.response_logprobs);
            // Same input again: the same numbers (deterministic).
            let (again, _) = dev.response_logits(&seq).map_err(|e| e.to_string())?;
            if again != logprobs {
                return Err("second forward differs from the first".into());
            }
            // The Pipeline entry point `score --device cuda` uses.
            let scored = pipe
                .score_on(&dev, &images, &prompt, &response)
                .map_err(|e| e.to_string())?;
            if scored.response_logprobs != logprobs || scored.input_ids != input.ids {
                return Err("score_on differs from the forward".into());
            }
            Ok(format!(
                "logprobs {e_lp:.1e} (max abs {d_lp:.1e}) logits {e_logits:.1e} hidden {e_h:.1e}"
            ))
        }),
    }
}
pub fn cases() -> Vec<Case> {
    ["single_noresize", "partial_windows", "two_images", "resize"]
        .into_iter()
        .map(model_case)
        .collect()
}
