//! The RL math of VPPO (and the GRPO/DAPO baselines) on host arrays: group
//! advantages, dynamic-sampling filter, trajectory-level advantage shaping
//! (TAS), token-level gradient filtering (TGF) and the dual-clip PPO loss
//! with its entropy penalty. The model only ever sees the result: a
//! gradient weight per response token ([`PolicyLoss::token_grads`]).
//!
//! Follows the VPPO reference code (EasyR1-based): see shared/docs/vppo.md.

pub mod advantage;
pub mod balance;
pub mod kl;
pub mod loss;
pub mod objective;
pub mod perturb;
pub mod shaping;

pub use advantage::{group_advantages, keep_group};
pub use kl::{KlEstimator, KlLoss};
pub use loss::{PolicyLoss, PolicyLossConfig};
pub use objective::{Shaping, VppoConfig};
pub use perturb::{
    blacken_patches, perturb_images, perturb_loaded_images, perturb_patches, PerturbSpace,
    Perturbation,
};
pub use shaping::{dependency_range, tas_scales, tgf_mask, visual_dependency, DependencyEstimator};
