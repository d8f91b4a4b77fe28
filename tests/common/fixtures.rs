//! Reading the committed transformers parity fixtures
//! (tests/fixtures/qwen2_5_vl, made by scripts/fixtures/make_qwen_fixtures.py).

use safetensors::tensor::{Dtype, SafeTensors};
use std::path::PathBuf;
use vppo_engine::model::SequenceInput;

pub const CASES: [&str; 4] = ["single_noresize", "partial_windows", "two_images", "resize"];

pub fn case_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen2_5_vl")
        .join(case)
}

pub fn inputs(case: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(case_dir(case).join("inputs.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A safetensors file read whole (fixtures are small).
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn open(case: &str, file: &str) -> Self {
        Self {
            bytes: std::fs::read(case_dir(case).join(file)).unwrap(),
        }
    }

    fn view(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name} missing"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    pub fn names(&self) -> Vec<String> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (dtype, shape, data) = self.view(name);
        assert_eq!(dtype, Dtype::F32, "{name}");
        (
            shape,
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }

    pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (dtype, shape, data) = self.view(name);
        assert_eq!(dtype, Dtype::I64, "{name}");
        (
            shape,
            data.chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The case's full model input (prompt + response) from its reference file,
/// and the prompt length.
pub fn fixture_input(case: &str) -> (SequenceInput, usize) {
    let r = Reference::open(case, "reference.safetensors");
    let input = SequenceInput {
        ids: r.i64("input_ids").1.iter().map(|&v| v as u32).collect(),
        pixel_values: r.f32("pixel_values").1,
        grids: r
            .i64("image_grid_thw")
            .1
            .chunks(3)
            .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
            .collect(),
        // torch's processor output only: no resized bytes.
        resized: Vec::new(),
        loaded: Vec::new(),
    };
    (input, r.i64("prompt_len").1[0] as usize)
}
