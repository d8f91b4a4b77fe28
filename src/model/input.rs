//! What the model takes: token sequences with their processed images.

/// One token sequence and its images (already processed).
#[derive(Debug, Clone, Default)]
pub struct SequenceInput {
    pub ids: Vec<u32>,
    /// Concatenated `[N, patch_dim]` of all images, in order.
    pub pixel_values: Vec<f32>,
    /// Patch grid `(t, h, w)` of each image.
    pub grids: Vec<[usize; 3]>,
    /// Each image after smart_resize, as 8-bit RGB (empty when the input
    /// was built from `pixel_values` alone): the GPU embeds patches, and
    /// draws VPPO's perturbed copy, straight from these bytes.
    pub resized: Vec<crate::processor::image::RgbImage>,
    /// Each image as it entered the processor's resize (after the data
    /// loading's): where `perturb_space = "pixels"` draws its tiles.
    pub loaded: Vec<crate::processor::image::RgbImage>,
}

/// A training sequence: the model input and where its response starts.
#[derive(Debug, Clone)]
pub struct TrainSequence {
    pub input: SequenceInput,
    pub prompt_len: usize,
}

/// The packed token ids and pixel rows of `inputs`.
pub fn packed_inputs(inputs: &[&SequenceInput]) -> (Vec<u32>, Vec<f32>) {
    let ids = inputs.iter().flat_map(|s| s.ids.iter().copied()).collect();
    let pixels = inputs
        .iter()
        .flat_map(|s| s.pixel_values.iter().copied())
        .collect();
    (ids, pixels)
}
