//! `vppo-engine launch` end to end with the real binary: ranks start with
//! torchrun's variables, and a failing rank stops the launch, named.

use std::process::Command;

fn engine() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
}

#[test]
fn launched_ranks_see_their_world_and_train_refuses_until_data_parallel_lands() {
    let dir = std::env::temp_dir().join(format!("vppo-launch-{}", std::process::id()));
    let out = engine()
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29517",
            "--",
            "train",
            "--quiet",
            "--out",
        ])
        .arg(dir.join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a 2-rank train must not pass silently: {err}"
    );
    assert!(err.contains("of 2 (torchrun)"), "{err}");
    assert!(err.contains("data-parallel training is not wired"), "{err}");
    assert!(
        err.contains("exited with exit code"),
        "the failing rank is named: {err}"
    );
}

#[test]
fn one_rank_runs_the_command_as_is() {
    let out = engine()
        .args([
            "launch",
            "--nproc-per-node",
            "1",
            "--",
            "grade",
            "--answer",
            "3",
            "--response",
            "\\boxed{3}",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .trim_end()
        .ends_with('1'));
}
