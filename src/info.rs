//! The report behind `vppo-engine info`: build, embedded kernels with their
//! ptxas resources, and the CUDA devices seen at run time.

use crate::backend::cuda;
use crate::kernels::{self, parse_ptxas_report};
use std::fmt::Write as _;

/// Renders the whole report as text.
pub fn report() -> String {
    let mut s = String::new();
    let _ = writeln!(s, "vppo-engine {}", env!("CARGO_PKG_VERSION"));
    match kernels::NVCC_VERSION {
        Some(v) => {
            let _ = writeln!(s, "nvcc: {v}");
        }
        None => {
            let _ = writeln!(s, "nvcc: not found at build time");
        }
    }
    if kernels::kernels_embedded() {
        let _ = writeln!(
            s,
            "CUDA kernels: embedded ({} modules)",
            kernels::KERNEL_MODULES.len()
        );
    } else {
        let _ = writeln!(s, "CUDA kernels: NOT embedded (built without kernels)");
    }
    if !kernels::BUILD_NOTE.is_empty() {
        let _ = writeln!(s, "build note: {}", kernels::BUILD_NOTE);
    }
    if kernels::kernels_embedded() {
        let _ = writeln!(
            s,
            "smem(B): static shared memory; dyn(B): dynamic shared memory of a tensor-core \
             attention launch; HMMA / HGMMA: tensor-core instructions in the SASS (cuobjdump), \
             ? = not read at build time"
        );
    }
    for m in kernels::KERNEL_MODULES {
        let _ = writeln!(
            s,
            "\nmodule {} ({} bytes) targets: {}",
            m.name,
            m.fatbin.len(),
            m.archs.join(", ")
        );
        let _ = writeln!(
            s,
            "  {:<34} {:<6} {:>5} {:>10} {:>7} {:>12} {:>6} {:>6} {:>9}",
            "kernel", "arch", "regs", "smem(B)", "stack", "spill st/ld", "HMMA", "HGMMA", "dyn(B)"
        );
        for r in parse_ptxas_report(m.ptxas_report) {
            // "?" when the build had no cuobjdump to read the SASS.
            let (hmma, hgmma) = match (m.mma, m.mma_of(&r.function, &r.arch)) {
                (None, _) => ("?".to_string(), "?".to_string()),
                (Some(_), None) => ("-".to_string(), "-".to_string()),
                (Some(_), Some(c)) => (c.hmma.to_string(), c.hgmma.to_string()),
            };
            let dynamic =
                cuda::tc_dynamic_smem(&r.function).map_or("-".to_string(), |b| b.to_string());
            let _ = writeln!(
                s,
                "  {:<34} {:<6} {:>5} {:>10} {:>7} {:>12} {:>6} {:>6} {:>9}",
                r.function,
                r.arch,
                r.registers,
                r.shared_bytes,
                r.stack_bytes,
                format!("{}/{}", r.spill_store_bytes, r.spill_load_bytes),
                hmma,
                hgmma,
                dynamic
            );
        }
    }
    let _ = writeln!(s);
    match cuda::list_devices() {
        Ok(devices) if devices.is_empty() => {
            let _ = writeln!(s, "CUDA devices: none (the driver reports no device)");
        }
        Ok(devices) => {
            let _ = writeln!(s, "CUDA devices: {}", devices.len());
            for d in devices {
                let _ = writeln!(
                    s,
                    "  [{}] {} sm_{}{} {} SMs {:.1} GiB",
                    d.ordinal,
                    d.name,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.multiprocessors,
                    d.total_mem_bytes as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(e) => {
            let _ = writeln!(s, "CUDA devices: none ({e}); the CPU backend will be used");
        }
    }
    let _ = writeln!(s, "CPU threads: {}", rayon::current_num_threads());
    s
}
