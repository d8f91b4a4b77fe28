//! Compiles every `kernels/*.cu` into a fatbin (sm_80 + sm_90 SASS, compute_90
//! PTX; files that ask for sm_90a get its SASS alone) and embeds the result in the
//! library through a generated `kernels_gen.rs`.
//!
//! Without nvcc the build succeeds with a warning and the binary reports that
//! it carries no kernels. `VPPO_REQUIRE_KERNELS=1` (set by CI) turns a missing
//! nvcc or a failed kernel compile into a build failure.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build/nvcc.rs"]
mod nvcc;
#[path = "build/sass.rs"]
mod sass;

/// Architectures every kernel is compiled for: (virtual arch, real arch).
const BASE_TARGETS: &[(&str, &str)] = &[("compute_80", "sm_80"), ("compute_90", "sm_90")];
/// Kernels that use wgmma/TMA say so with this marker on a line of their own.
const SM90A_MARKER: &str = "// vppo: needs sm_90a";

struct KernelSource {
    name: String,
    path: PathBuf,
    needs_sm90a: bool,
}

struct Compiled {
    name: String,
    archs: Vec<String>,
    fatbin: PathBuf,
    ptxas_report: String,
    /// HMMA/HGMMA per kernel and arch; `None` without cuobjdump.
    mma: Option<Vec<sass::MmaCount>>,
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest_dir.join("kernels");
    let require = env::var("VPPO_REQUIRE_KERNELS").is_ok_and(|v| v == "1" || v == "true");

    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=VPPO_REQUIRE_KERNELS");
    println!("cargo:rerun-if-env-changed=CUOBJDUMP");
    println!("cargo:rerun-if-changed={}", kernel_dir.display());
    // Installing the toolchain after a kernel-less build must trigger a rebuild.
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join(".cuda-toolchain/.vppo-pins").display()
    );

    let sources = list_kernel_sources(&kernel_dir);
    for entry in fs::read_dir(&kernel_dir).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", entry.path().display());
    }

    let Some(nvcc) = nvcc::find_nvcc(&|k| env::var_os(k), &manifest_dir) else {
        let msg = "nvcc not found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, .cuda-toolchain/, PATH, /usr/local/cuda/bin, /opt/cuda/bin): \
                   building WITHOUT CUDA kernels, so the binary runs on the CPU only \
                   (run scripts/install-cuda-toolchain.sh to get the pinned nvcc 13.0, then build again)";
        if require {
            panic!("VPPO_REQUIRE_KERNELS is set but {msg}");
        }
        println!("cargo:warning={msg}");
        write_generated(&out_dir, None, &[], &[], msg);
        return;
    };
    let nvcc_version = nvcc_version(&nvcc);

    let fatbin_dir = out_dir.join("kernels");
    fs::create_dir_all(&fatbin_dir).expect("create OUT_DIR/kernels");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut results: Vec<Result<Compiled, String>> = Vec::new();
    for chunk in sources.chunks(threads.max(1)) {
        let handles: Vec<_> = chunk
            .iter()
            .map(|src| {
                let nvcc = nvcc.clone();
                let kernel_dir = kernel_dir.clone();
                let fatbin_dir = fatbin_dir.clone();
                let src = KernelSource {
                    name: src.name.clone(),
                    path: src.path.clone(),
                    needs_sm90a: src.needs_sm90a,
                };
                std::thread::spawn(move || compile_one(&nvcc, &kernel_dir, &fatbin_dir, &src))
            })
            .collect();
        results.extend(
            handles
                .into_iter()
                .map(|h| h.join().expect("nvcc thread panicked")),
        );
    }

    // The SASS proof of tensor cores (`vppo-engine info`): cuobjdump is
    // optional here; CI's scripts/check-tensor-cores.sh requires it.
    let cuobjdump = sass::find_cuobjdump(&nvcc, env::var_os("CUOBJDUMP").map(PathBuf::from));
    let mut compiled = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(mut c) => {
                if let Some(tool) = &cuobjdump {
                    match sass::dump_sass(tool, &c.fatbin) {
                        Ok(text) => c.mma = Some(sass::mma_counts(&text)),
                        Err(e) => println!("cargo:warning=no SASS counts for {}: {e}", c.name),
                    }
                }
                for line in spill_lines(&c.ptxas_report) {
                    println!("cargo:warning=kernel {} spills registers: {line}", c.name);
                }
                compiled.push(c);
            }
            Err(e) => failures.push(e),
        }
    }
    if !failures.is_empty() {
        let joined = failures.join("\n");
        if require {
            panic!("kernel compilation failed (VPPO_REQUIRE_KERNELS is set):\n{joined}");
        }
        for f in &failures {
            for line in f.lines().take(20) {
                println!("cargo:warning={line}");
            }
        }
    }
    let note = if failures.is_empty() {
        String::new()
    } else {
        format!(
            "{} kernel file(s) failed to compile and are missing",
            failures.len()
        )
    };
    write_generated(&out_dir, Some(&nvcc_version), &compiled, &failures, &note);
}

fn list_kernel_sources(dir: &Path) -> Vec<KernelSource> {
    let mut sources: Vec<KernelSource> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|path| {
            let text = fs::read_to_string(&path).unwrap_or_default();
            KernelSource {
                name: path.file_stem().unwrap().to_string_lossy().into_owned(),
                needs_sm90a: text.lines().any(|l| l.trim() == SM90A_MARKER),
                path,
            }
        })
        .collect();
    sources.sort_by(|a, b| a.name.cmp(&b.name));
    sources
}

fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc).arg("--version").output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.contains("release"))
            .unwrap_or("unknown")
            .trim()
            .to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

fn compile_one(
    nvcc: &Path,
    kernel_dir: &Path,
    fatbin_dir: &Path,
    src: &KernelSource,
) -> Result<Compiled, String> {
    let fatbin = fatbin_dir.join(format!("{}.fatbin", src.name));
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .arg("-O3")
        .arg("-std=c++17")
        .arg("-lineinfo")
        .arg("-Xptxas")
        .arg("-v")
        .arg("-I")
        .arg(kernel_dir);
    let mut archs = Vec::new();
    if src.needs_sm90a {
        // Only the sm_90a image: a fatbin that also held sm_90 SASS would
        // leave the driver's choice between the two to chance on Hopper.
        // The backend loads such a module on compute capability 9.0 only.
        cmd.arg("-gencode=arch=compute_90a,code=sm_90a");
        archs.push("sm_90a".to_string());
    } else {
        for (virt, real) in BASE_TARGETS {
            cmd.arg(format!("-gencode=arch={virt},code={real}"));
            archs.push(real.to_string());
        }
        // PTX of the newest portable arch, so a newer GPU can JIT it.
        cmd.arg("-gencode=arch=compute_90,code=compute_90");
        archs.push("compute_90 (PTX)".to_string());
    }
    cmd.arg("-o").arg(&fatbin).arg(&src.path);

    let out = cmd.output().map_err(|e| {
        format!(
            "{}: cannot run nvcc {}: {e}",
            src.path.display(),
            nvcc.display()
        )
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{}: nvcc failed ({}):\n{stderr}",
            src.path.display(),
            out.status
        ));
    }
    Ok(Compiled {
        name: src.name.clone(),
        archs,
        fatbin,
        ptxas_report: stderr,
        mma: None,
    })
}

/// Lines of the ptxas report that announce register spills.
fn spill_lines(report: &str) -> Vec<String> {
    report
        .lines()
        .filter(|l| l.contains("spill stores") && !l.contains(" 0 bytes spill stores"))
        .map(|l| l.trim().to_string())
        .collect()
}

fn write_generated(
    out_dir: &Path,
    nvcc_version: Option<&str>,
    compiled: &[Compiled],
    failures: &[String],
    note: &str,
) {
    let mut s = String::new();
    writeln!(s, "// @generated by build.rs").unwrap();
    writeln!(
        s,
        "pub const NVCC_VERSION: Option<&str> = {:?};",
        nvcc_version
    )
    .unwrap();
    writeln!(s, "pub const BUILD_NOTE: &str = {:?};", note).unwrap();
    writeln!(
        s,
        "pub const FAILED_KERNEL_FILES: usize = {};",
        failures.len()
    )
    .unwrap();
    writeln!(s, "pub static KERNEL_MODULES: &[KernelModule] = &[").unwrap();
    for c in compiled {
        writeln!(
            s,
            "    KernelModule {{ name: {:?}, archs: &{:?}, fatbin: include_bytes!({:?}), ptxas_report: {:?}, mma: {} }},",
            c.name,
            c.archs,
            c.fatbin.display().to_string(),
            c.ptxas_report,
            mma_literal(c.mma.as_deref())
        )
        .unwrap();
    }
    writeln!(s, "];").unwrap();
    fs::write(out_dir.join("kernels_gen.rs"), s).expect("write kernels_gen.rs");
}

/// `Some(&[KernelMma { .. }, ..])` or `None`, as Rust source.
fn mma_literal(mma: Option<&[sass::MmaCount]>) -> String {
    let Some(rows) = mma else {
        return "None".to_string();
    };
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "KernelMma {{ function: {:?}, arch: {:?}, hmma: {}, hgmma: {} }}",
                r.function, r.arch, r.hmma, r.hgmma
            )
        })
        .collect();
    format!("Some(&[{}])", items.join(", "))
}
