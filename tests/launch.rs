//! `vppo-engine launch` end to end with the real binary: ranks start with
//! torchrun's variables, and a failing rank stops the launch, named.

use std::process::Command;

fn engine() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vppo-engine"))
}

#[test]
fn two_launched_ranks_train_the_builtin_task_together() {
    let dir = std::env::temp_dir().join(format!("vppo-launch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = dir.join("run");
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
        .arg(&run)
        .args([
            "warmup_steps=60",
            "warmup_batch=16",
            "rollout_batch=4",
            "mini_batch=2",
            "group_size=4",
            "micro_batch=2",
            "max_steps=2",
            "collective_timeout_s=120",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Rank 0 alone speaks and writes the metrics; both wrote a shard.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"rollout_batch\""))
            .count(),
        2
    );
    let latest = std::fs::read_to_string(run.join("latest")).unwrap();
    for rank in 0..2 {
        let shard = run
            .join(latest.trim())
            .join(format!("optimizer-rank{rank:05}-of-00002.safetensors"));
        assert!(shard.is_file(), "{}", shard.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failing_rank_stops_the_launch_named() {
    let out = engine()
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29518",
            "--",
            "train",
            "--quiet",
            "--out",
        ])
        .arg(std::env::temp_dir().join(format!("vppo-launch-bad-{}", std::process::id())))
        .args(["rollout_batch=3", "mini_batch=2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rollout_batch = 3"), "{err}");
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

/// Ranks started as torchrun starts them: its agent holds MASTER_PORT
/// (for its own store) and tells the workers so.
#[test]
fn torchrun_ranks_rendezvous_beside_the_agents_store() {
    let agent_store = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = agent_store.local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("vppo-torchrun-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            engine()
                .args(["train", "--quiet", "--out"])
                .arg(dir.join("run"))
                .args([
                    "warmup_steps=20",
                    "rollout_batch=2",
                    "mini_batch=2",
                    "group_size=2",
                    "max_steps=1",
                    "collective_timeout_s=120",
                ])
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("TORCHELASTIC_USE_AGENT_STORE", "True")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in ranks {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(agent_store);
    assert!(dir.join("run/metrics.jsonl").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}
