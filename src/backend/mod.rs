//! Compute backends. `cpu` holds the reference implementation of every op
//! (the test oracle and the fallback without a GPU); `cuda` runs the
//! hand-written kernels of `kernels/` through cudarc and must match `cpu`.

pub mod cpu;
pub mod cuda;
pub mod desc;

/// Where a command computes: `auto` is the GPU when one is usable (a CUDA
/// driver, a device, and kernels embedded in this binary), else the CPU.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl Device {
    /// The device `auto` stands for on this machine; `cpu_only` when the
    /// command needs what only the CPU backend has.
    pub fn resolve(self, cpu_only: bool) -> Device {
        match self {
            Device::Auto if !cpu_only && gpu_usable() => Device::Cuda,
            Device::Auto => Device::Cpu,
            chosen => chosen,
        }
    }
}

/// A CUDA driver, at least one device, and kernels embedded in this binary.
pub fn gpu_usable() -> bool {
    crate::kernels::kernels_embedded() && cuda::list_devices().is_ok_and(|d| !d.is_empty())
}

/// The GPU of this process: `LOCAL_RANK` under a launcher (torchrun sets
/// it, one process per GPU), else device 0.
pub fn local_ordinal() -> usize {
    std::env::var("LOCAL_RANK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Opens this process's GPU ([`local_ordinal`]): the one place a command
/// picks its CUDA device.
pub fn open_local_gpu() -> Result<cuda::CudaBackend, String> {
    let ordinal = local_ordinal();
    cuda::CudaBackend::new(ordinal).map_err(|e| format!("cannot open CUDA device {ordinal}: {e}"))
}
