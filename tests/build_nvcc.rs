//! Where the build looks for nvcc (issue 17: the first command gets the
//! GPU build when CUDA is installed in its usual place), and the toolchain
//! script's `--if-missing`, which leaves a machine's own nvcc alone.

#[path = "../build/nvcc.rs"]
#[allow(dead_code)]
mod nvcc;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
    let map: HashMap<String, OsString> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), OsString::from(v)))
        .collect();
    move |k| map.get(k).cloned()
}

#[test]
fn candidates_are_the_variables_then_path_then_the_standard_installs() {
    let env = env_of(&[
        ("NVCC", "/x/nvcc"),
        ("CUDA_HOME", "/home-cuda"),
        ("CUDA_PATH", "/path-cuda"),
        ("PATH", "/usr/bin:/bin"),
    ]);
    let got = nvcc::nvcc_candidates(&env, Path::new("/no/such/repo"));
    let want: Vec<PathBuf> = [
        "/x/nvcc",
        "/home-cuda/bin/nvcc",
        "/path-cuda/bin/nvcc",
        "/usr/bin/nvcc",
        "/bin/nvcc",
        "/usr/local/cuda/bin/nvcc",
        "/opt/cuda/bin/nvcc",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    assert_eq!(got, want);
}

#[test]
fn cuda_path_alone_is_enough_and_the_first_existing_one_wins() {
    let dir = std::env::temp_dir().join(format!("vppo-nvcc-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("bin/nvcc"), "#!/bin/sh\n").unwrap();
    let env = env_of(&[
        ("CUDA_HOME", "/no/such/cuda"),
        ("CUDA_PATH", dir.to_str().unwrap()),
        ("PATH", "/no/such/bin"),
    ]);
    assert_eq!(
        nvcc::find_nvcc(&env, Path::new("/no/such/repo")),
        Some(dir.join("bin/nvcc"))
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_toolchain_script_installs_nothing_when_an_nvcc_is_there() {
    let dir = std::env::temp_dir().join(format!("vppo-nvcc-script-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("nvcc");
    std::fs::write(&fake, "#!/bin/sh\n").unwrap();
    let venv = dir.join("venv");
    let out = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/install-cuda-toolchain.sh"
        ))
        .arg("--if-missing")
        .arg(&venv)
        .env("NVCC", &fake)
        .output()
        .expect("run the script");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().last(), Some(fake.to_str().unwrap()));
    assert!(!venv.exists(), "nothing was installed");
    std::fs::remove_dir_all(&dir).unwrap();
}
