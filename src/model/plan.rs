//! Everything the host computes for one forward of packed sequences,
//! whatever the backend: M-RoPE positions, the vision window layout, and
//! the index arrays the ops read (image rows, response rows, targets).

use super::config::ModelConfig;
use super::error::ModelError;
use super::input::SequenceInput;
use super::positions::{mrope_positions, MropePositions, VisionLayout};

/// The sizes of one packed forward: tokens, patches, windows...
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForwardShape {
    /// Packed sequences.
    pub seqs: usize,
    /// Tokens of all of them.
    pub tokens: usize,
    /// Vision patches of all its images.
    pub patches: usize,
    /// Non-empty attention windows (+1 offsets each) and image frames.
    pub windows: usize,
    pub frames: usize,
    /// Image tokens (= merged patches).
    pub image_tokens: usize,
    /// Rows scored by the lm_head.
    pub response: usize,
}

/// Everything the host computes for one forward of one or more packed
/// sequences: positions, the vision window layout and the index arrays
/// the device reads.
#[derive(Debug, Clone)]
pub struct HostPlan {
    pub shape: ForwardShape,
    /// Each sequence's M-RoPE positions.
    pub positions: Vec<MropePositions>,
    /// `[3, T]`: the t, h, w streams back to back (sequences concatenated
    /// within each stream).
    pub text_positions: Vec<i32>,
    /// Token offsets of the packed sequences: `[0, T_1, T_1 + T_2, ...]`.
    pub cu_text: Vec<i32>,
    pub image_rows: Vec<i32>,
    /// Present when a sequence has images.
    pub vision: Option<VisionPlan>,
    /// Hidden rows predicting each response token, and those tokens.
    pub response_rows: Vec<i32>,
    pub targets: Vec<u32>,
    /// Scored tokens of each sequence.
    pub response_lens: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct VisionPlan {
    pub layout: VisionLayout,
    /// Processor-order patch index of each windowed position.
    pub patch_order: Vec<i32>,
    /// `[2, N]`: row then column of each patch, in windowed order.
    pub positions: Vec<i32>,
    /// Windowed position -> merged token (processor order).
    pub window_index: Vec<i32>,
}

fn to_i32s(v: impl IntoIterator<Item = usize>) -> Vec<i32> {
    v.into_iter().map(|x| x as i32).collect()
}

impl HostPlan {
    /// The plan of `input`, scoring the tokens from `prompt_len` on (none
    /// when `prompt_len` is `None`).
    pub fn new(
        cfg: &ModelConfig,
        input: &SequenceInput,
        prompt_len: Option<usize>,
    ) -> Result<Self, ModelError> {
        Self::packed(cfg, &[input], &[prompt_len])
    }

    /// The plan of `inputs` packed into one forward (all images through the
    /// vision tower together, each sequence its own positions and causal
    /// span), scoring sequence `i` from
    /// `prompt_lens[i]` on.
    pub fn packed(
        cfg: &ModelConfig,
        inputs: &[&SequenceInput],
        prompt_lens: &[Option<usize>],
    ) -> Result<Self, ModelError> {
        assert_eq!(
            inputs.len(),
            prompt_lens.len(),
            "one prompt length per input"
        );
        let vc = &cfg.vision;
        let pd = vc.patch_dim();
        let image_id = cfg.tokens.image_token_id;
        let mut positions = Vec::with_capacity(inputs.len());
        let (mut ids_len, mut patches) = (0usize, 0usize);
        let mut cu_text = vec![0i32];
        let mut image_rows = Vec::new();
        let mut grids = Vec::new();
        let (mut response_rows, mut targets, mut response_lens) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut streams: [Vec<i32>; 3] = Default::default();
        for (seq, (input, &prompt_len)) in inputs.iter().zip(prompt_lens).enumerate() {
            if input.pixel_values.len() % pd != 0 {
                return Err(ModelError::PixelShape {
                    len: input.pixel_values.len(),
                    patch_dim: pd,
                });
            }
            let t = input.ids.len();
            let pos = mrope_positions(&input.ids, image_id, &input.grids, vc.spatial_merge_size)?;
            for (stream, part) in streams.iter_mut().zip([&pos.t, &pos.h, &pos.w]) {
                stream.extend_from_slice(part);
            }
            positions.push(pos);
            let rows: Vec<usize> = (0..t).filter(|&i| input.ids[i] == image_id).collect();
            let n = input.pixel_values.len() / pd;
            let grid_patches: usize = input
                .grids
                .iter()
                .map(|g| g.iter().product::<usize>())
                .sum();
            let features = n / vc.merge_unit().max(1);
            // The CPU tower asserts the first; here both are input errors.
            if grid_patches != n || features != rows.len() {
                return Err(ModelError::ImageTokens {
                    tokens: rows.len(),
                    features,
                });
            }
            image_rows.extend(to_i32s(rows.iter().map(|r| ids_len + r)));
            grids.extend_from_slice(&input.grids);
            match prompt_len {
                Some(p) if p > 0 && p < t => {
                    response_rows.extend(to_i32s((p - 1..t - 1).map(|r| ids_len + r)));
                    targets.extend_from_slice(&input.ids[p..]);
                    response_lens.push(t - p);
                }
                Some(p) => {
                    return Err(ModelError::NoResponse {
                        seq,
                        prompt_len: p,
                        len: t,
                    })
                }
                None => response_lens.push(0),
            }
            ids_len += t;
            patches += n;
            cu_text.push(ids_len as i32);
        }
        let unit = vc.merge_unit();
        let vision = (!grids.is_empty()).then(|| {
            let layout = VisionLayout::new(&grids, vc.spatial_merge_size, vc.window_merged());
            let order = layout.patch_order(unit);
            let mut pos: Vec<i32> = order.iter().map(|&i| layout.rows[i]).collect();
            pos.extend(order.iter().map(|&i| layout.cols[i]));
            VisionPlan {
                patch_order: to_i32s(order.iter().copied()),
                positions: pos,
                window_index: to_i32s(layout.window_index.iter().copied()),
                layout,
            }
        });
        let shape = ForwardShape {
            seqs: inputs.len(),
            tokens: ids_len,
            patches,
            windows: vision.as_ref().map_or(0, |v| v.layout.cu_window.len() - 1),
            frames: vision.as_ref().map_or(0, |v| v.layout.cu_full.len() - 1),
            image_tokens: image_rows.len(),
            response: response_rows.len(),
        };
        Ok(Self {
            shape,
            positions,
            text_positions: streams.concat(),
            cu_text,
            image_rows,
            vision,
            response_rows,
            targets,
            response_lens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ModelConfig;
    use std::path::Path;

    fn fixture() -> (ModelConfig, SequenceInput) {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_5_vl/single_noresize");
        let cfg = ModelConfig::load(&dir).expect("fixture config");
        // A 4x6-patch image (2x3 merged tokens) between 2 and 3 text tokens.
        let img = cfg.tokens.image_token_id;
        let mut ids = vec![1, 2];
        ids.extend([img; 6]);
        ids.extend([3, 4, 5]);
        let input = SequenceInput {
            ids,
            pixel_values: vec![0.5; 24 * cfg.vision.patch_dim()],
            grids: vec![[1, 4, 6]],
            ..Default::default()
        };
        (cfg, input)
    }

    #[test]
    fn host_plan_matches_the_cpu_layout() {
        let (cfg, input) = fixture();
        let plan = HostPlan::new(&cfg, &input, Some(9)).unwrap();
        assert_eq!(
            plan.shape,
            ForwardShape {
                seqs: 1,
                tokens: 11,
                patches: 24,
                windows: 1,
                frames: 1,
                image_tokens: 6,
                response: 2,
            }
        );
        assert_eq!(plan.image_rows, vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(plan.response_rows, vec![8, 9]);
        assert_eq!(plan.targets, vec![4, 5]);
        assert_eq!(plan.text_positions.len(), 3 * 11);
        assert_eq!(&plan.text_positions[..11], &plan.positions[0].t[..]);
        let vp = plan.vision.as_ref().unwrap();
        // Windows of 4x4 merged tokens cover the 2x3 image in one window,
        // so the permutation is the identity.
        assert_eq!(vp.patch_order, (0..24).collect::<Vec<_>>());
        assert_eq!(vp.positions.len(), 48);
        assert_eq!(&vp.positions[..4], &[0, 0, 1, 1]);
        assert_eq!(&vp.positions[24..28], &[0, 1, 0, 1]);
    }

    /// Two sequences packed: offsets, per-sequence positions (each starts
    /// over), both images through one vision layout.
    #[test]
    fn packed_host_plan_concatenates_the_sequences() {
        let (cfg, input) = fixture();
        let text = SequenceInput {
            ids: vec![9, 8, 7],
            ..Default::default()
        };
        let one = HostPlan::new(&cfg, &input, Some(9)).unwrap();
        let plan =
            HostPlan::packed(&cfg, &[&input, &text, &input], &[Some(9), Some(1), None]).unwrap();
        assert_eq!(plan.cu_text, vec![0, 11, 14, 25]);
        assert_eq!(plan.shape.seqs, 3);
        assert_eq!((plan.shape.patches, plan.shape.image_tokens), (48, 12));
        let second_image: Vec<i32> = one.image_rows.iter().map(|r| r + 14).collect();
        assert_eq!(
            plan.image_rows,
            [one.image_rows.clone(), second_image].concat()
        );
        assert_eq!(plan.response_rows, vec![8, 9, 11, 12]);
        assert_eq!(plan.targets, vec![4, 5, 8, 7]);
        assert_eq!(plan.response_lens, vec![2, 2, 0]);
        // Each stream holds the sequences back to back, each from its own origin.
        let t_stream = &plan.text_positions[..25];
        assert_eq!(&t_stream[..11], &one.positions[0].t[..]);
        assert_eq!(&t_stream[11..14], &[0, 1, 2]);
        assert_eq!(&t_stream[14..], &one.positions[0].t[..]);
        assert_eq!(plan.text_positions.len(), 75);
        let vp = plan.vision.as_ref().unwrap();
        assert_eq!(vp.layout.cu_full, vec![0, 24, 48]);
        assert_eq!(vp.patch_order.len(), 48);
        let err = HostPlan::packed(&cfg, &[&input, &text], &[Some(9), Some(3)]).unwrap_err();
        assert!(
            matches!(err, ModelError::NoResponse { seq: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn host_plan_rejects_mismatched_inputs() {
        let (cfg, mut input) = fixture();
        assert!(matches!(
            HostPlan::new(&cfg, &input, Some(11)),
            Err(ModelError::NoResponse { .. })
        ));
        input.pixel_values.pop();
        assert!(matches!(
            HostPlan::new(&cfg, &input, None),
            Err(ModelError::PixelShape { .. })
        ));
    }
}
