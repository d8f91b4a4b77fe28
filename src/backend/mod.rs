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
            Device::Auto => {
                warn_unused_gpu();
                Device::Cpu
            }
            chosen => chosen,
        }
    }
}

/// How to get a binary that carries the kernels.
pub const REBUILD_HINT: &str =
    "rebuild with them: `scripts/install-cuda-toolchain.sh && cargo build --release` \
     (or set NVCC or CUDA_HOME to an nvcc 13.0), then `vppo-engine info` shows the kernels";

/// The warning for a machine with CUDA devices that this binary cannot use
/// because it was built without kernels (no nvcc at build time); `None`
/// when the kernels are there or there is no device.
pub fn kernelless_gpu_message(kernels_embedded: bool, devices: &[String]) -> Option<String> {
    if kernels_embedded || devices.is_empty() {
        return None;
    }
    Some(format!(
        "this machine has {} CUDA device(s) ({}), but this binary was built WITHOUT CUDA kernels \
         (no nvcc was found at build time), so it cannot use them; {REBUILD_HINT}",
        devices.len(),
        devices.join(", ")
    ))
}

/// [`kernelless_gpu_message`] for this binary on this machine.
pub fn kernelless_gpu() -> Option<String> {
    if crate::kernels::kernels_embedded() {
        return None;
    }
    let names: Vec<String> = cuda::list_devices()
        .map(|d| d.into_iter().map(|d| d.name).collect())
        .unwrap_or_default();
    kernelless_gpu_message(false, &names)
}

/// Says, once per process and loudly, that `auto` falls back to the CPU
/// although there is a GPU: a run that silently trains on the CPU of a GPU
/// machine wastes hours before anyone notices.
fn warn_unused_gpu() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Some(msg) = kernelless_gpu() {
            eprintln!("\n**** WARNING: running on the CPU. {msg} ****\n");
        }
    });
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

#[cfg(test)]
mod device_tests {
    use super::*;

    #[test]
    fn a_gpu_without_kernels_is_named_with_how_to_rebuild() {
        let msg = kernelless_gpu_message(false, &["NVIDIA H200".into()]).expect("a warning");
        assert!(
            msg.contains("NVIDIA H200") && msg.contains("WITHOUT CUDA kernels"),
            "{msg}"
        );
        assert!(msg.contains("scripts/install-cuda-toolchain.sh"), "{msg}");
        assert_eq!(kernelless_gpu_message(true, &["NVIDIA H200".into()]), None);
        assert_eq!(
            kernelless_gpu_message(false, &[]),
            None,
            "no GPU: nothing to say"
        );
    }
}
