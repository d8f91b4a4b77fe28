//! NCCL through `distributed::nccl` at world size 1 (the GPU machine has one
//! GPU): the TCP rendezvous hands over the unique id, the communicator
//! initialises, and every collective of one rank returns its input.

use crate::{random, Case};
use std::time::Duration;
use vppo_engine::distributed::nccl::NcclGroup;
use vppo_engine::distributed::World;
use vppo_engine::ops::Backend;

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "nccl world=1: rendezvous, all-reduce, reduce-scatter, all-gather".into(),
        run: Box::new(|gpu, rng| {
            // A port nobody holds now, for rank 0's rendezvous listener.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
            let world = World {
                master: format!("127.0.0.1:{port}"),
                ..World::single()
            };
            let group =
                NcclGroup::join(gpu, &world, Duration::from_secs(30)).map_err(|e| e.to_string())?;
            let x = random(rng, 1000, 1.0);
            let mut buf = gpu.upload(&x).map_err(|e| e.to_string())?;
            group.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
            let mut shard = gpu.zeros(x.len()).map_err(|e| e.to_string())?;
            group
                .reduce_scatter_sum(&buf, &mut shard)
                .map_err(|e| e.to_string())?;
            let mut gathered = gpu.zeros(x.len()).map_err(|e| e.to_string())?;
            group
                .all_gather(&shard, &mut gathered)
                .map_err(|e| e.to_string())?;
            for (what, b) in [
                ("all-reduce", &buf),
                ("reduce-scatter", &shard),
                ("all-gather", &gathered),
            ] {
                let got = gpu.download(b).map_err(|e| e.to_string())?;
                if got != x {
                    return Err(format!("{what} of one rank changed its input"));
                }
            }
            Ok(format!("rank {} of {}", group.rank(), group.world_size()))
        }),
    }]
}
