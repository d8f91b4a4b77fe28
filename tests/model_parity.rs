//! The Qwen2.5-VL forward against transformers (fp32, eager) on the committed
//! fixtures: M-RoPE positions exactly; vision embeddings, final hidden
//! states, response logits and log-probs within 1e-4 absolute.

mod common;

use common::fixtures::{case_dir, max_abs_diff, Reference, CASES};
use vppo_engine::model::{Qwen25Vl, SequenceInput};

const TOL: f32 = 1e-4;

fn log_softmax_at(logits: &[f32], target: usize) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + logits.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
    logits[target] - lse
}

#[test]
fn forward_matches_transformers_on_every_fixture() {
    for case in CASES {
        let model = Qwen25Vl::load(&case_dir(case)).unwrap();
        let r = Reference::open(case, "reference.safetensors");
        let ids: Vec<u32> = r.i64("input_ids").1.iter().map(|&v| v as u32).collect();
        let prompt_len = r.i64("prompt_len").1[0] as usize;
        let grids: Vec<[usize; 3]> = r
            .i64("image_grid_thw")
            .1
            .chunks(3)
            .map(|g| [g[0] as usize, g[1] as usize, g[2] as usize])
            .collect();
        let input = SequenceInput {
            ids: ids.clone(),
            pixel_values: r.f32("pixel_values").1,
            grids,
            ..Default::default()
        };
        let out = model.forward(&input).unwrap();

        let (_, pos) = r.i64("position_ids");
        let t = ids.len();
        let got: Vec<i64> = [&out.positions.t, &out.positions.h, &out.positions.w]
            .iter()
            .flat_map(|s| s.iter().map(|&v| v as i64))
            .collect();
        assert_eq!(got, pos, "{case}: position ids");
        assert_eq!(
            out.positions.rope_delta,
            r.i64("rope_deltas").1[0],
            "{case}: rope delta"
        );

        let d_vision = max_abs_diff(&out.vision_embeds, &r.f32("vision_embeds").1);
        let d_hidden = max_abs_diff(&out.hidden, &r.f32("hidden_last").1);
        let rows: Vec<usize> = (prompt_len - 1..t - 1).collect();
        let logits = model.logits(&out, &rows);
        let d_logits = max_abs_diff(&logits, &r.f32("response_logits").1);
        let vocab = model.config.text.vocab_size;
        let logprobs: Vec<f32> = rows
            .iter()
            .enumerate()
            .map(|(i, &row)| {
                log_softmax_at(&logits[i * vocab..(i + 1) * vocab], ids[row + 1] as usize)
            })
            .collect();
        let d_lp = max_abs_diff(&logprobs, &r.f32("response_logprobs").1);
        println!("{case}: max abs diff vision {d_vision:.2e} hidden {d_hidden:.2e} logits {d_logits:.2e} logprobs {d_lp:.2e}");
        assert!(
            d_vision < TOL,
            "{case}: vision embeddings differ by {d_vision}"
        );
        assert!(d_hidden < TOL, "{case}: hidden states differ by {d_hidden}");
        assert!(d_logits < TOL, "{case}: logits differ by {d_logits}");
        assert!(d_lp < TOL, "{case}: log-probs differ by {d_lp}");
    }
}
