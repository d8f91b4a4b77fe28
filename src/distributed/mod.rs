//! Multi-process runs: who this process is (from the launcher's environment),
//! the collective operations ranks agree through, and the launcher that
//! starts the ranks of one node.
//!
//! GPUs talk through NCCL only ([`nccl`]); the host groups here carry CPU
//! ranks (tests, CPU runs) and the one-off rendezvous that hands NCCL its id.

pub mod collective;
pub mod launch;
pub mod nccl;
pub mod tcp;
pub mod threads;
pub mod world;

pub use collective::{Collective, DistError};
pub use world::World;
