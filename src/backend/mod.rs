//! Compute backends. `cpu` holds the reference implementation of every op
//! (the test oracle and the fallback without a GPU); `cuda` runs the
//! hand-written kernels of `kernels/` through cudarc and must match `cpu`.

pub mod cpu;
pub mod cuda;
