//! Who this process is in a multi-process run, read from the launcher's
//! environment: torchrun and `vppo-engine launch` (RANK, LOCAL_RANK,
//! WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or Slurm's srun (SLURM_PROCID,
//! SLURM_LOCALID, SLURM_STEP_NUM_TASKS, the first node of
//! SLURM_JOB_NODELIST). A batch script's own process sees SLURM_PROCID and
//! SLURM_NTASKS too, but is one process: only srun sets the step's task
//! count, so only it makes a Slurm world.

/// The default rendezvous port, torchrun's.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    /// This process's GPU on its node.
    pub local_rank: usize,
    pub world_size: usize,
    /// Where rank 0 listens for the rendezvous (`host:port`).
    pub master: String,
    /// Which launcher set it up, for messages.
    pub launcher: &'static str,
}

/// A launcher variable that is missing or malformed, by name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{launcher} environment: {message}")]
pub struct WorldError {
    pub launcher: &'static str,
    pub message: String,
}

impl World {
    /// A single process (no launcher).
    pub fn single() -> World {
        World {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            master: format!("127.0.0.1:{DEFAULT_MASTER_PORT}"),
            launcher: "single process",
        }
    }

    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// From this process's environment.
    pub fn from_env() -> Result<World, WorldError> {
        World::from_vars(|k| std::env::var(k).ok())
    }

    /// From a variable lookup (the environment, or a map in tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<World, WorldError> {
        if var("WORLD_SIZE").is_some() || var("RANK").is_some() {
            return torchrun(&var);
        }
        if var("SLURM_PROCID").is_some() && var("SLURM_STEP_NUM_TASKS").is_some() {
            return slurm(&var);
        }
        Ok(World::single())
    }
}

fn number(
    var: &impl Fn(&str) -> Option<String>,
    launcher: &'static str,
    name: &str,
) -> Result<Option<usize>, WorldError> {
    match var(name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| WorldError {
            launcher,
            message: format!("{name}={v:?} is not a non-negative integer"),
        }),
    }
}

fn required(
    var: &impl Fn(&str) -> Option<String>,
    launcher: &'static str,
    name: &str,
) -> Result<usize, WorldError> {
    number(var, launcher, name)?.ok_or_else(|| WorldError {
        launcher,
        message: format!("{name} is not set"),
    })
}

fn check(world: World) -> Result<World, WorldError> {
    if world.world_size == 0 || world.rank >= world.world_size {
        return Err(WorldError {
            launcher: world.launcher,
            message: format!(
                "rank {} is outside a world of {} processes",
                world.rank, world.world_size
            ),
        });
    }
    Ok(world)
}

fn master(
    var: &impl Fn(&str) -> Option<String>,
    launcher: &'static str,
    host: Option<String>,
    world_size: usize,
) -> Result<String, WorldError> {
    let port = match number(var, launcher, "MASTER_PORT")? {
        None => DEFAULT_MASTER_PORT,
        Some(p) => u16::try_from(p).map_err(|_| WorldError {
            launcher,
            message: format!("MASTER_PORT={p} is not a port"),
        })?,
    };
    let host = match host {
        Some(h) => h,
        None if world_size == 1 => "127.0.0.1".to_string(),
        None => {
            return Err(WorldError {
                launcher,
                message: "MASTER_ADDR is not set (the address of rank 0's node)".into(),
            })
        }
    };
    Ok(format!("{host}:{port}"))
}

fn torchrun(var: &impl Fn(&str) -> Option<String>) -> Result<World, WorldError> {
    const L: &str = "torchrun";
    let world_size = required(var, L, "WORLD_SIZE")?;
    let rank = required(var, L, "RANK")?;
    let local_rank = number(var, L, "LOCAL_RANK")?.unwrap_or(0);
    let mut master = master(var, L, var("MASTER_ADDR"), world_size)?;
    if var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        // torchrun's agent holds MASTER_PORT for its own store: rank 0
        // listens on the next port.
        master = next_port(&master).ok_or_else(|| WorldError {
            launcher: L,
            message: format!("MASTER_PORT of {master} leaves no next port for the rendezvous"),
        })?;
    }
    check(World {
        rank,
        local_rank,
        world_size,
        master,
        launcher: L,
    })
}

/// `host:port` with the port after it.
fn next_port(master: &str) -> Option<String> {
    let (host, port) = master.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(format!("{host}:{}", port.checked_add(1)?))
}

fn slurm(var: &impl Fn(&str) -> Option<String>) -> Result<World, WorldError> {
    const L: &str = "slurm";
    let rank = required(var, L, "SLURM_PROCID")?;
    let world_size = required(var, L, "SLURM_STEP_NUM_TASKS")?;
    let local_rank = number(var, L, "SLURM_LOCALID")?.unwrap_or(0);
    let host = var("MASTER_ADDR").or_else(|| {
        var("SLURM_JOB_NODELIST")
            .or_else(|| var("SLURM_NODELIST"))
            .and_then(|list| first_host(&list))
    });
    let master = master(var, L, host, world_size)?;
    check(World {
        rank,
        local_rank,
        world_size,
        master,
        launcher: L,
    })
}

/// The first host of a Slurm host list: `gpu[03-04,07],cpu01` -> `gpu03`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list
        .char_indices()
        .scan(0i32, |depth, (i, c)| {
            match c {
                '[' => *depth += 1,
                ']' => *depth -= 1,
                _ => {}
            }
            Some((i, c, *depth))
        })
        .find(|&(_, c, depth)| c == ',' && depth == 0)
        .map_or(list.len(), |(i, _, _)| i);
    let first = &list[..end];
    let host = match first.find('[') {
        None => first.to_string(),
        Some(open) => {
            let inner = first[open + 1..].trim_end_matches(']');
            let lead = inner.split([',', '-']).next()?;
            format!("{}{lead}", &first[..open])
        }
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<World, WorldError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn no_launcher_is_one_process() {
        assert_eq!(world(&[]).unwrap(), World::single());
    }

    #[test]
    fn torchrun_variables_give_rank_local_rank_and_master() {
        let w = world(&[
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "8"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.local_rank, w.world_size), (5, 1, 8));
        assert_eq!(w.master, "node0:1234");
        assert!(w.is_distributed());
        // Under torchrun's agent, which holds MASTER_PORT for its store.
        let w = world(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap();
        assert_eq!(w.master, "node0:1235");
    }

    #[test]
    fn slurm_variables_and_the_first_node_of_the_list() {
        let w = world(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_LOCALID", "3"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_STEP_NUM_TASKS", "16"),
            ("SLURM_JOB_NODELIST", "gpu[07-08,11],login1"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.local_rank, w.world_size), (3, 3, 16));
        assert_eq!(w.master, "gpu07:29500");
        assert_eq!(first_host("a01"), Some("a01".into()));
        assert_eq!(first_host("n[1,3],m2"), Some("n1".into()));
    }

    #[test]
    fn a_batch_scripts_own_process_is_one_process() {
        // sbatch sets the allocation's task count; no srun step ran it.
        let w = world(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_JOB_NODELIST", "gpu01"),
        ])
        .unwrap();
        assert_eq!(w, World::single());
    }

    #[test]
    fn bad_values_are_named() {
        let e = world(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("RANK=\"x\""), "{e}");
        let e = world(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]).unwrap_err();
        assert!(e.to_string().contains("outside a world of 2"), "{e}");
        let e = world(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR is not set"), "{e}");
        let e = world(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("not a port"), "{e}");
    }
}
