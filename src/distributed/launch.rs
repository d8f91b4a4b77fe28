//! `vppo-engine launch`: starts this node's ranks as child processes with
//! torchrun's variables, streams their output, and stops them all when one
//! fails, naming it. Multi-node: run it once per node with `--nnodes`,
//! `--node-rank` and the first node's `--master-addr`.

use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchPlan {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

/// How the ranks ended when not all of them succeeded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchError {
    #[error("launch: {0}")]
    Plan(String),
    #[error("rank {rank} could not start: {message}")]
    Spawn { rank: usize, message: String },
    #[error("rank {rank} exited with {status}; the other ranks of this node were stopped")]
    RankFailed { rank: usize, status: String },
}

impl LaunchPlan {
    pub fn world_size(&self) -> usize {
        self.nproc_per_node * self.nnodes
    }

    /// The environment of local rank `local`.
    pub fn env(&self, local: usize) -> Vec<(&'static str, String)> {
        let rank = self.node_rank * self.nproc_per_node + local;
        vec![
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", local.to_string()),
            ("WORLD_SIZE", self.world_size().to_string()),
            ("LOCAL_WORLD_SIZE", self.nproc_per_node.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
    }

    fn validate(&self) -> Result<(), LaunchError> {
        if self.nproc_per_node == 0 || self.nnodes == 0 {
            return Err(LaunchError::Plan(
                "--nproc-per-node and --nnodes must be at least 1".into(),
            ));
        }
        if self.node_rank >= self.nnodes {
            return Err(LaunchError::Plan(format!(
                "--node-rank {} with --nnodes {}",
                self.node_rank, self.nnodes
            )));
        }
        Ok(())
    }

    /// Runs `program args...` once per local rank and waits for all of them.
    pub fn run(&self, program: &Path, args: &[String]) -> Result<(), LaunchError> {
        self.validate()?;
        let first = self.node_rank * self.nproc_per_node;
        let mut children: Vec<(usize, Child)> = Vec::new();
        for local in 0..self.nproc_per_node {
            let mut cmd = Command::new(program);
            cmd.args(args);
            for (k, v) in self.env(local) {
                cmd.env(k, v);
            }
            match cmd.spawn() {
                Ok(child) => children.push((first + local, child)),
                Err(e) => {
                    stop_all(&mut children);
                    return Err(LaunchError::Spawn {
                        rank: first + local,
                        message: format!("{}: {e}", program.display()),
                    });
                }
            }
        }
        let result = wait_all(&mut children);
        if result.is_err() {
            stop_all(&mut children);
        }
        result
    }
}

/// Polls the children until all exit 0 or one fails.
fn wait_all(children: &mut [(usize, Child)]) -> Result<(), LaunchError> {
    let mut done = vec![false; children.len()];
    while done.iter().any(|d| !d) {
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) if status.success() => done[i] = true,
                Ok(Some(status)) => {
                    return Err(LaunchError::RankFailed {
                        rank: *rank,
                        status: describe(status),
                    })
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(LaunchError::RankFailed {
                        rank: *rank,
                        status: format!("an unknown status ({e})"),
                    })
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit code {code}"),
        None => format!("{status} (killed by a signal)"),
    }
}

fn stop_all(children: &mut [(usize, Child)]) {
    for (_, child) in children.iter_mut() {
        let _ = child.kill();
    }
    for (_, child) in children.iter_mut() {
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(n: usize) -> LaunchPlan {
        LaunchPlan {
            nproc_per_node: n,
            nnodes: 2,
            node_rank: 1,
            master_addr: "10.0.0.1".into(),
            master_port: 29501,
        }
    }

    #[test]
    fn ranks_get_torchrun_variables() {
        let env = plan(4).env(2);
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("RANK"), Some("6"));
        assert_eq!(get("LOCAL_RANK"), Some("2"));
        assert_eq!(get("WORLD_SIZE"), Some("8"));
        assert_eq!(get("MASTER_ADDR"), Some("10.0.0.1"));
        assert_eq!(get("MASTER_PORT"), Some("29501"));
    }

    #[test]
    fn every_rank_runs_and_a_failing_rank_is_named_and_stops_the_rest() {
        let sh = Path::new("/bin/sh");
        let mut p = plan(3);
        p.nnodes = 1;
        p.node_rank = 0;
        // All succeed: each rank checks its own variables.
        let ok = [
            "-c".to_string(),
            "test \"$WORLD_SIZE\" = 3 && test \"$RANK\" = \"$LOCAL_RANK\"".to_string(),
        ];
        assert_eq!(p.run(sh, &ok), Ok(()));
        // Rank 1 fails at once; rank 0 and 2 would run for a minute.
        let t = std::time::Instant::now();
        let fail = [
            "-c".to_string(),
            "if [ \"$RANK\" = 1 ]; then exit 7; fi; sleep 60".to_string(),
        ];
        assert_eq!(
            p.run(sh, &fail),
            Err(LaunchError::RankFailed {
                rank: 1,
                status: "exit code 7".into()
            })
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the others were not stopped"
        );
    }

    #[test]
    fn a_bad_plan_is_refused() {
        let mut p = plan(2);
        p.node_rank = 2;
        assert!(matches!(
            p.run(Path::new("/bin/true"), &[]),
            Err(LaunchError::Plan(_))
        ));
    }
}
