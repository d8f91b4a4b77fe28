//! A group of processes over TCP, through rank 0 (a star): the rendezvous of
//! every multi-process run (NCCL's unique id travels over it) and the
//! collective of CPU ranks. Rank 0 listens at MASTER_ADDR:MASTER_PORT; the
//! others connect, retrying until the timeout, and name themselves.
//! Messages: an 8-byte little-endian length, then the bytes.

use super::{Collective, DistError};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub struct TcpGroup {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// Rank 0: the stream of rank r at index r - 1. Others: the stream to rank 0.
    peers: Vec<TcpStream>,
}

/// A frame larger than this is a corrupt length, not a real message.
const MAX_FRAME: u64 = 1 << 40;

impl TcpGroup {
    /// Joins the group of `world_size` ranks whose rank 0 listens at `addr`.
    /// Fails, naming the missing ranks, if the group is not complete within
    /// `timeout`.
    pub fn join(
        addr: &str,
        rank: usize,
        world_size: usize,
        timeout: Duration,
    ) -> Result<TcpGroup, DistError> {
        if rank >= world_size {
            return Err(DistError::Setup(format!(
                "rank {rank} of a group of {world_size}"
            )));
        }
        let deadline = Instant::now() + timeout;
        let peers = if rank == 0 {
            let listener = TcpListener::bind(resolve(addr)?).map_err(|e| {
                DistError::Setup(format!(
                    "rank 0 cannot listen at {addr}: {e} (is MASTER_PORT taken by another run?)"
                ))
            })?;
            accept_all(&listener, world_size, deadline, timeout)?
        } else {
            vec![connect(addr, rank, world_size, deadline, timeout)?]
        };
        TcpGroup::finish(rank, world_size, timeout, peers)
    }

    /// Rank 0 of a group on a listener it already holds.
    pub fn serve(
        listener: &TcpListener,
        world_size: usize,
        timeout: Duration,
    ) -> Result<TcpGroup, DistError> {
        let peers = accept_all(listener, world_size, Instant::now() + timeout, timeout)?;
        TcpGroup::finish(0, world_size, timeout, peers)
    }

    /// How long a rank waits for the others from now on.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), DistError> {
        for p in &self.peers {
            p.set_read_timeout(Some(timeout))
                .and_then(|_| p.set_write_timeout(Some(timeout)))
                .map_err(|e| DistError::Setup(format!("socket options: {e}")))?;
        }
        self.timeout = timeout;
        Ok(())
    }

    fn finish(
        rank: usize,
        world_size: usize,
        timeout: Duration,
        peers: Vec<TcpStream>,
    ) -> Result<TcpGroup, DistError> {
        for p in &peers {
            p.set_read_timeout(Some(timeout))
                .and_then(|_| p.set_write_timeout(Some(timeout)))
                .and_then(|_| p.set_nodelay(true))
                .map_err(|e| DistError::Setup(format!("socket options: {e}")))?;
        }
        Ok(TcpGroup {
            rank,
            world_size,
            timeout,
            peers,
        })
    }
}

/// A failed read or write with `rank`, as the error callers branch on.
fn io_error(timeout: Duration, rank: usize, e: std::io::Error) -> DistError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => DistError::Timeout {
            ranks: vec![rank],
            timeout,
        },
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => DistError::PeerLost { rank },
        _ => DistError::Io {
            rank,
            message: e.to_string(),
        },
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, DistError> {
    addr.to_socket_addrs()
        .map_err(|e| {
            DistError::Setup(format!(
                "cannot resolve MASTER_ADDR:MASTER_PORT {addr}: {e}"
            ))
        })?
        .next()
        .ok_or_else(|| DistError::Setup(format!("{addr} resolves to no address")))
}

fn accept_all(
    listener: &TcpListener,
    world_size: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<TcpStream>, DistError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| DistError::Setup(e.to_string()))?;
    let mut peers: Vec<Option<TcpStream>> = (1..world_size).map(|_| None).collect();
    while peers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)
                    .and_then(|_| s.set_read_timeout(Some(Duration::from_secs(5))))
                    .map_err(|e| DistError::Setup(e.to_string()))?;
                let mut hello = [0u8; 16];
                if s.read_exact(&mut hello).is_err() {
                    continue; // not one of ours, or gave up
                }
                let r = u64::from_le_bytes(hello[..8].try_into().expect("8 bytes")) as usize;
                let w = u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) as usize;
                if w != world_size || r == 0 || r >= world_size {
                    return Err(DistError::Setup(format!(
                        "a process says it is rank {r} of {w}; this group has {world_size} ranks (do WORLD_SIZE values differ?)"
                    )));
                }
                if peers[r - 1].is_some() {
                    return Err(DistError::Setup(format!(
                        "two processes say they are rank {r}"
                    )));
                }
                peers[r - 1] = Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let ranks = peers
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| p.is_none())
                        .map(|(i, _)| i + 1)
                        .collect();
                    return Err(DistError::Timeout { ranks, timeout });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(DistError::Setup(format!("accept: {e}"))),
        }
    }
    Ok(peers.into_iter().flatten().collect())
}

fn connect(
    addr: &str,
    rank: usize,
    world_size: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, DistError> {
    let target = resolve(addr)?;
    loop {
        match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
            Ok(mut s) => {
                let mut hello = [0u8; 16];
                hello[..8].copy_from_slice(&(rank as u64).to_le_bytes());
                hello[8..].copy_from_slice(&(world_size as u64).to_le_bytes());
                s.write_all(&hello)
                    .map_err(|e| DistError::Setup(format!("hello to rank 0 at {addr}: {e}")))?;
                return Ok(s);
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(DistError::Setup(format!(
                    "rank {rank} could not reach rank 0 at {addr} within {timeout:?}: {e} (is rank 0 running, and MASTER_ADDR right?)"
                )))
            }
        }
    }
}

fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn exchange(&mut self, mine: &[u8]) -> Result<Vec<Vec<u8>>, DistError> {
        let timeout = self.timeout;
        if self.rank != 0 {
            let s = &mut self.peers[0];
            let err = |e| io_error(timeout, 0, e);
            write_frame(s, mine).map_err(err)?;
            return (0..self.world_size)
                .map(|_| read_frame(s).map_err(err))
                .collect();
        }
        let mut all = vec![mine.to_vec()];
        for (i, s) in self.peers.iter_mut().enumerate() {
            all.push(read_frame(s).map_err(|e| io_error(timeout, i + 1, e))?);
        }
        for (i, s) in self.peers.iter_mut().enumerate() {
            for m in &all {
                write_frame(s, m).map_err(|e| io_error(timeout, i + 1, e))?;
            }
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank 0's listener on a free localhost port, and its address (held,
    /// not released, so no concurrent test can take the port meanwhile).
    fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("127.0.0.1:{}", l.local_addr().unwrap().port());
        (l, addr)
    }

    fn join(
        l: &Option<TcpListener>,
        addr: &str,
        rank: usize,
        world: usize,
        t: Duration,
    ) -> Result<TcpGroup, DistError> {
        match l {
            Some(l) if rank == 0 => TcpGroup::serve(l, world, t),
            _ => TcpGroup::join(addr, rank, world, t),
        }
    }

    #[test]
    fn processes_agree_over_tcp_as_threads_do_in_process() {
        let (l, addr) = listener();
        let mut l = Some(l);
        let world = 3;
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let addr = addr.clone();
                let l = if rank == 0 { l.take() } else { None };
                std::thread::spawn(move || {
                    let mut g = join(&l, &addr, rank, world, Duration::from_secs(20)).unwrap();
                    let mut buf: Vec<f32> =
                        (0..5).map(|i| i as f32 * (rank as f32 + 0.25)).collect();
                    g.all_reduce_sum(&mut buf).unwrap();
                    let mut shard = vec![0.0; 2];
                    g.reduce_scatter_sum(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &mut shard)
                        .unwrap();
                    let mut root = vec![rank as f32; 3];
                    g.broadcast(&mut root, 1).unwrap();
                    (buf, shard, root)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        // Rank-order sums: i * (0.25 + 1.25 + 2.25).
        let want: Vec<f32> = (0..5)
            .map(|i| {
                let i = i as f32;
                0.0 + i * 0.25 + i * 1.25 + i * 2.25
            })
            .collect();
        for (rank, (buf, shard, root)) in results.into_iter().enumerate() {
            assert_eq!(buf, want);
            let full = [3.0, 6.0, 9.0, 12.0, 15.0, 18.0];
            assert_eq!(shard.as_slice(), &full[rank * 2..rank * 2 + 2]);
            assert_eq!(root, vec![1.0; 3]);
        }
    }

    #[test]
    fn rank_zero_names_the_ranks_that_never_connected() {
        let (l, _) = listener();
        let err = TcpGroup::serve(&l, 3, Duration::from_millis(300))
            .err()
            .unwrap();
        assert_eq!(
            err,
            DistError::Timeout {
                ranks: vec![1, 2],
                timeout: Duration::from_millis(300)
            }
        );
    }

    #[test]
    fn a_rank_whose_process_exits_is_named_by_the_others() {
        let (l, addr) = listener();
        let a2 = addr.clone();
        let leaver = std::thread::spawn(move || {
            let g = TcpGroup::join(&a2, 1, 2, Duration::from_secs(20)).unwrap();
            drop(g); // the process "exits": its socket closes
        });
        let mut g0 = TcpGroup::serve(&l, 2, Duration::from_secs(20)).unwrap();
        leaver.join().unwrap();
        let err = g0.barrier().unwrap_err();
        assert_eq!(err, DistError::PeerLost { rank: 1 });
    }
}
