//! Turning user inputs into model inputs: images (decode, resize,
//! normalise, patchify) and text (chat template, tokenizer).

pub mod image;
pub mod resize;
pub mod text;
