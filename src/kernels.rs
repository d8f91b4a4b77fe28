//! The CUDA kernel modules compiled by `build.rs` and embedded in the binary,
//! with the ptxas resource report of each kernel.

/// One `kernels/<name>.cu` file compiled to a fatbin.
#[derive(Debug)]
pub struct KernelModule {
    /// File stem of the source, e.g. `rmsnorm`.
    pub name: &'static str,
    /// Targets inside the fatbin (SASS archs and the PTX fallback).
    pub archs: &'static [&'static str],
    /// The fatbin, loadable with `cuModuleLoadData`.
    pub fatbin: &'static [u8],
    /// nvcc's `-Xptxas -v` output for this file, verbatim.
    pub ptxas_report: &'static str,
    /// Tensor-core instructions per kernel and arch, counted in the SASS
    /// (`cuobjdump -sass`) at build time; `None` when the build had no cuobjdump.
    pub mma: Option<&'static [KernelMma]>,
}

/// MMA instructions of one kernel in one architecture's SASS: `hmma`
/// (mma.sync, sm_80/sm_90) and `hgmma` (warpgroup MMA, sm_90a).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelMma {
    pub function: &'static str,
    pub arch: &'static str,
    pub hmma: u32,
    pub hgmma: u32,
}

impl KernelModule {
    /// Built for sm_90a alone (wgmma, TMA): loadable on compute capability
    /// 9.0 only.
    pub fn hopper_only(&self) -> bool {
        self.archs == ["sm_90a"]
    }

    /// The SASS counts of `function` for `arch`, when the build read them.
    pub fn mma_of(&self, function: &str, arch: &str) -> Option<&'static KernelMma> {
        self.mma?
            .iter()
            .find(|m| m.function == function && m.arch == arch)
    }
}

include!(concat!(env!("OUT_DIR"), "/kernels_gen.rs"));

/// Whether this binary was built with CUDA kernels.
pub fn kernels_embedded() -> bool {
    !KERNEL_MODULES.is_empty()
}

/// Looks up an embedded module by file stem.
pub fn module(name: &str) -> Option<&'static KernelModule> {
    KERNEL_MODULES.iter().find(|m| m.name == name)
}

/// Resources ptxas assigned to one kernel for one architecture.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelResources {
    pub function: String,
    pub arch: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// Parses nvcc's `-Xptxas -v` report into one record per (kernel, arch).
///
/// The report interleaves lines such as
/// `Compiling entry function 'rmsnorm_fwd_f32' for 'sm_90'`,
/// `0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads` and
/// `Used 24 registers, used 1 barriers, 128 bytes smem`.
pub fn parse_ptxas_report(report: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    for line in report.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let function = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            out.push(KernelResources {
                function,
                arch,
                ..Default::default()
            });
            continue;
        }
        let Some(current) = out.last_mut() else {
            continue;
        };
        if line.contains("bytes stack frame") {
            current.stack_bytes = number_before(line, "bytes stack frame");
            current.spill_store_bytes = number_before(line, "bytes spill stores");
            current.spill_load_bytes = number_before(line, "bytes spill loads");
        } else if line.contains("Used ") && line.contains("registers") {
            current.registers = number_before(line, "registers");
            current.shared_bytes = number_before(line, "bytes smem");
        }
    }
    out
}

/// The integer right before `label` in `line` (0 when absent).
fn number_before(line: &str, label: &str) -> u32 {
    line.find(label)
        .and_then(|at| line[..at].split_whitespace().last())
        .and_then(|n| n.trim_start_matches(',').parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'rmsnorm_bwd_f32' for 'sm_80'
ptxas info    : Function properties for rmsnorm_bwd_f32
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'k3' for 'sm_90'
ptxas info    : Function properties for k3
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 0 barriers
";

    #[test]
    fn parses_every_field_of_a_ptxas_report() {
        let r = parse_ptxas_report(SAMPLE);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelResources {
                function: "rmsnorm_bwd_f32".into(),
                arch: "sm_80".into(),
                registers: 40,
                shared_bytes: 128,
                stack_bytes: 8,
                spill_store_bytes: 4,
                spill_load_bytes: 12,
            }
        );
        assert_eq!(r[1].function, "k3");
        assert_eq!(r[1].arch, "sm_90");
        assert_eq!(r[1].registers, 14);
        assert_eq!(r[1].shared_bytes, 0);
    }

    #[test]
    fn embedded_modules_match_the_build() {
        // With kernels embedded, every module has a non-empty fatbin and a
        // report naming at least one kernel for each of its archs: sm_80
        // and sm_90, or sm_90a alone for the Hopper-only files.
        for m in KERNEL_MODULES {
            assert!(!m.fatbin.is_empty(), "{} has an empty fatbin", m.name);
            let res = parse_ptxas_report(m.ptxas_report);
            let archs: &[&str] = if m.hopper_only() {
                &["sm_90a"]
            } else {
                &["sm_80", "sm_90"]
            };
            for &arch in archs {
                assert!(
                    res.iter().any(|r| r.arch == arch),
                    "{} has no kernel built for {arch}",
                    m.name
                );
            }
        }
    }

    #[test]
    fn every_kernel_source_is_embedded_when_kernels_are_required() {
        // CI builds with VPPO_REQUIRE_KERNELS=1: there, a .cu file that did not
        // make it into the binary is a failure, not a warning.
        if std::env::var("VPPO_REQUIRE_KERNELS").as_deref() != Ok("1") {
            println!("VPPO_REQUIRE_KERNELS is not 1: only checking embedded modules");
        } else {
            assert!(NVCC_VERSION.is_some());
            assert_eq!(FAILED_KERNEL_FILES, 0);
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "cu") {
                let stem = path.file_stem().unwrap().to_str().unwrap();
                let embedded = module(stem).is_some();
                if std::env::var("VPPO_REQUIRE_KERNELS").as_deref() == Ok("1") {
                    assert!(embedded, "kernels/{stem}.cu is not embedded");
                } else if !embedded {
                    println!("kernels/{stem}.cu is not embedded (built without nvcc)");
                }
            }
        }
    }
}
