//! The CPU backend: ring all-reduce over TCP between the rank processes of
//! one attempt.
//!
//! **Bootstrap.** Every rank listens on a port of its own. Rank 0's address
//! is known to all (the daemon publishes it through the coordinator's
//! rendezvous); every other rank connects to it and says hello with its
//! rank, the attempt's token and its own listening address. Rank 0 answers
//! each with the table of all addresses, then every rank connects to the
//! next rank's listener and accepts one connection from the previous rank:
//! a ring of `world` one-way links. A hello with another token (a rank of
//! an older attempt) is refused.
//!
//! **All-reduce** is the bandwidth-optimal ring: reduce-scatter then
//! all-gather, each `world - 1` steps of one chunk (a `1/world` share of
//! the buffer) sent to the next rank while the chunk from the previous
//! rank is received, on two threads so neither side waits for the other's
//! socket buffer. Every message starts with a header (operation, step,
//! length) that the receiver checks, so ranks that disagree on what they
//! reduce fail loudly instead of mixing buffers.
//!
//! **Timeouts.** Every socket read and write, connect and accept has a
//! deadline; a rank that dies closes its sockets and its neighbours fail
//! at once, a rank that hangs makes them fail after the timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};

use super::{flatten, scatter_back, Collective, CollectiveError};

/// Bytes of one ring message payload at most; larger chunks are split.
const SEGMENT_BYTES: usize = 1 << 20;

/// Operation codes of the message header.
const OP_REDUCE: u32 = 1;
const OP_GATHER: u32 = 2;
const OP_BROADCAST: u32 = 3;

/// How a rank joins the ring.
#[derive(Clone, Debug)]
pub struct RingConfig {
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// The attempt's token (run id and attempt); hellos with another token
    /// are refused.
    pub token: String,
    /// Deadline of every network operation.
    pub timeout: Duration,
}

/// A rank's listening socket, bound before its address is published.
#[derive(Debug)]
pub struct RingListener {
    listener: TcpListener,
}

impl RingListener {
    /// Binds `addr` (port 0 picks a free port).
    ///
    /// # Errors
    ///
    /// Fails when the address cannot be bound.
    pub fn bind(addr: &str) -> Result<Self, CollectiveError> {
        let listener = TcpListener::bind(addr).map_err(|e| failed("bind", e))?;
        Ok(RingListener { listener })
    }

    /// The address peers connect to.
    ///
    /// # Errors
    ///
    /// Fails when the socket has no local address.
    pub fn local_addr(&self) -> Result<SocketAddr, CollectiveError> {
        self.listener.local_addr().map_err(|e| failed("bind", e))
    }
}

/// One rank's links of the ring.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    timeout: Duration,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    /// Sequence number of collective calls, checked in every header.
    calls: u32,
}

fn failed(op: &'static str, err: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Failed { op, message: err.to_string() }
}

fn io_err(op: &'static str, timeout: Duration, err: &std::io::Error) -> CollectiveError {
    match err.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            CollectiveError::Timeout { op, seconds: timeout.as_secs() }
        }
        _ => failed(op, format!("a peer rank is gone ({err})")),
    }
}

fn configure(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

/// Accepts one connection before the deadline.
fn accept(listener: &TcpListener, timeout: Duration) -> Result<TcpStream, CollectiveError> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true).map_err(|e| failed("accept", e))?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| failed("accept", e))?;
                configure(&stream, timeout).map_err(|e| failed("accept", e))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(CollectiveError::Timeout {
                        op: "bootstrap",
                        seconds: timeout.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(failed("accept", e)),
        }
    }
}

/// Connects before the deadline, retrying while the peer is not listening.
fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, CollectiveError> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                configure(&stream, timeout).map_err(|e| failed("connect", e))?;
                return Ok(stream);
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(%addr, error = %e, "peer not reachable yet");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(failed("connect", format!("cannot reach {addr}: {e}"))),
        }
    }
}

fn write_frame(
    stream: &mut TcpStream,
    bytes: &[u8],
    timeout: Duration,
) -> Result<(), CollectiveError> {
    let len = u32::try_from(bytes.len()).map_err(|e| failed("bootstrap", e))?;
    stream
        .write_all(&len.to_le_bytes())
        .and_then(|()| stream.write_all(bytes))
        .map_err(|e| io_err("bootstrap", timeout, &e))
}

fn read_frame(stream: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, CollectiveError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(|e| io_err("bootstrap", timeout, &e))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 1 << 20 {
        return Err(failed("bootstrap", format!("frame of {len} bytes")));
    }
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes).map_err(|e| io_err("bootstrap", timeout, &e))?;
    Ok(bytes)
}

impl TcpRing {
    /// Joins the ring. `master` is rank 0's listening address (ignored on
    /// rank 0, whose own listener it is); `listener` is this rank's.
    ///
    /// # Errors
    ///
    /// A timeout when a peer does not show up; a failure when a hello
    /// carries another token or the network breaks.
    pub fn connect(
        config: &RingConfig,
        listener: RingListener,
        master: Option<SocketAddr>,
    ) -> Result<Self, CollectiveError> {
        let RingConfig { rank, world, ref token, timeout } = *config;
        if world <= 1 {
            return Ok(TcpRing { rank: 0, world: 1, timeout, next: None, prev: None, calls: 0 });
        }
        let own = listener.local_addr()?;
        let table: Vec<SocketAddr> = if rank == 0 {
            let mut table = vec![own; world];
            let mut hellos = Vec::new();
            while hellos.len() < world - 1 {
                let mut stream = accept(&listener.listener, timeout)?;
                let hello =
                    String::from_utf8_lossy(&read_frame(&mut stream, timeout)?).into_owned();
                let mut parts = hello.splitn(3, ' ');
                let (peer, peer_token, addr) = (parts.next(), parts.next(), parts.next());
                if peer_token != Some(token.as_str()) {
                    tracing::warn!(%hello, "refused a rank of another attempt");
                    let _ = write_frame(&mut stream, b"refused", timeout);
                    continue;
                }
                let peer: usize = peer
                    .and_then(|p| p.parse().ok())
                    .filter(|&p| p > 0 && p < world)
                    .ok_or_else(|| failed("bootstrap", format!("bad hello {hello:?}")))?;
                let addr: SocketAddr = addr
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| failed("bootstrap", format!("bad hello {hello:?}")))?;
                table[peer] = addr;
                hellos.push(stream);
            }
            let text = table.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ");
            for mut stream in hellos {
                write_frame(&mut stream, text.as_bytes(), timeout)?;
            }
            table
        } else {
            let master =
                master.ok_or_else(|| failed("bootstrap", "rank 0's address is missing"))?;
            let mut stream = connect(master, timeout)?;
            write_frame(&mut stream, format!("{rank} {token} {own}").as_bytes(), timeout)?;
            let reply = String::from_utf8_lossy(&read_frame(&mut stream, timeout)?).into_owned();
            if reply == "refused" {
                return Err(failed("bootstrap", "rank 0 refused this rank: another attempt"));
            }
            let table: Vec<SocketAddr> = reply.split(' ').filter_map(|a| a.parse().ok()).collect();
            if table.len() != world {
                return Err(failed(
                    "bootstrap",
                    format!("address table {reply:?} for {world} ranks"),
                ));
            }
            table
        };
        // Connect to the next rank while accepting the previous one.
        let next_addr = table[(rank + 1) % world];
        let (next, prev) = std::thread::scope(|scope| {
            let next = scope.spawn(|| {
                let mut stream = connect(next_addr, timeout)?;
                stream
                    .write_all(&u32::try_from(rank).unwrap_or(0).to_le_bytes())
                    .map_err(|e| io_err("bootstrap", timeout, &e))?;
                Ok::<_, CollectiveError>(stream)
            });
            let prev = (|| {
                let mut stream = accept(&listener.listener, timeout)?;
                let mut who = [0u8; 4];
                stream.read_exact(&mut who).map_err(|e| io_err("bootstrap", timeout, &e))?;
                let expected = (rank + world - 1) % world;
                if u32::from_le_bytes(who) as usize != expected {
                    return Err(failed("bootstrap", "the ring was joined out of order"));
                }
                Ok(stream)
            })();
            (
                next.join().unwrap_or_else(|_| Err(failed("bootstrap", "connect thread panicked"))),
                prev,
            )
        });
        tracing::info!(rank, world, "collective ring connected");
        Ok(TcpRing { rank, world, timeout, next: Some(next?), prev: Some(prev?), calls: 0 })
    }

    /// Sum-all-reduces `data` in place over the ring.
    ///
    /// # Errors
    ///
    /// A timeout or a broken link.
    pub fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let world = self.world;
        if world <= 1 || data.is_empty() {
            return Ok(());
        }
        self.calls = self.calls.wrapping_add(1);
        let bounds: Vec<(usize, usize)> =
            (0..world).map(|i| (data.len() * i / world, data.len() * (i + 1) / world)).collect();
        for phase in [OP_REDUCE, OP_GATHER] {
            for step in 0..world - 1 {
                let (send_chunk, recv_chunk) = if phase == OP_REDUCE {
                    ((self.rank + world - step) % world, (self.rank + world - step - 1) % world)
                } else {
                    ((self.rank + world - step + 1) % world, (self.rank + world - step) % world)
                };
                let tag = (phase, u32::try_from(step).unwrap_or(0), self.calls);
                let (send, recv) = disjoint(data, bounds[send_chunk], bounds[recv_chunk]);
                self.exchange(send, recv, phase == OP_REDUCE, tag)?;
            }
        }
        Ok(())
    }

    /// Sends `outgoing` to the next rank while receiving a chunk of the
    /// same kind from the previous one, segment by segment, adding it into
    /// `target` (`add`) or copying it there; both carry the header `tag`.
    fn exchange(
        &mut self,
        outgoing: &[f32],
        target: &mut [f32],
        add: bool,
        tag: (u32, u32, u32),
    ) -> Result<(), CollectiveError> {
        let timeout = self.timeout;
        let (Some(next), Some(prev)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Err(failed("all_reduce", "the ring is not connected"));
        };
        let op = "all_reduce";
        std::thread::scope(|scope| {
            let bytes: &[u8] = bytemuck::cast_slice(outgoing);
            let sender = scope.spawn(move || send_message(next, bytes, tag, timeout, op));
            let received = (|| {
                recv_header(prev, target.len() * 4, tag, timeout, op)?;
                let mut segment = vec![0f32; SEGMENT_BYTES / 4];
                for part in target.chunks_mut(SEGMENT_BYTES / 4) {
                    let buf = &mut segment[..part.len()];
                    prev.read_exact(bytemuck::cast_slice_mut(buf))
                        .map_err(|e| io_err(op, timeout, &e))?;
                    if add {
                        for (t, v) in part.iter_mut().zip(buf.iter()) {
                            *t += v;
                        }
                    } else {
                        part.copy_from_slice(buf);
                    }
                }
                Ok(())
            })();
            let sent = sender.join().unwrap_or_else(|_| Err(failed(op, "send thread panicked")));
            sent.and(received)
        })
    }

    /// Copies rank 0's `data` to every rank, passed along the ring.
    ///
    /// # Errors
    ///
    /// A timeout or a broken link.
    pub fn broadcast_bytes(&mut self, data: &mut [u8]) -> Result<(), CollectiveError> {
        if self.world <= 1 {
            return Ok(());
        }
        self.calls = self.calls.wrapping_add(1);
        let tag = (OP_BROADCAST, 0, self.calls);
        let last = (self.rank + 1) % self.world == 0;
        let timeout = self.timeout;
        if self.rank != 0 {
            let prev = self.prev.as_mut().ok_or_else(|| failed("broadcast", "not connected"))?;
            recv_message(prev, data, tag, timeout, "broadcast")?;
        }
        if !last {
            let next = self.next.as_mut().ok_or_else(|| failed("broadcast", "not connected"))?;
            send_message(next, data, tag, timeout, "broadcast")?;
        }
        Ok(())
    }
}

fn send_message(
    stream: &mut TcpStream,
    bytes: &[u8],
    (op_code, step, call): (u32, u32, u32),
    timeout: Duration,
    op: &'static str,
) -> Result<(), CollectiveError> {
    let mut header = [0u8; 20];
    header[..4].copy_from_slice(&op_code.to_le_bytes());
    header[4..8].copy_from_slice(&step.to_le_bytes());
    header[8..12].copy_from_slice(&call.to_le_bytes());
    header[12..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
    stream.write_all(&header).map_err(|e| io_err(op, timeout, &e))?;
    for segment in bytes.chunks(SEGMENT_BYTES) {
        stream.write_all(segment).map_err(|e| io_err(op, timeout, &e))?;
    }
    Ok(())
}

fn recv_header(
    stream: &mut TcpStream,
    expect: usize,
    (op_code, step, call): (u32, u32, u32),
    timeout: Duration,
    op: &'static str,
) -> Result<(), CollectiveError> {
    let mut header = [0u8; 20];
    stream.read_exact(&mut header).map_err(|e| io_err(op, timeout, &e))?;
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[12..]);
    let len = u64::from_le_bytes(len);
    if (word(0), word(4), word(8)) != (op_code, step, call) || len != expect as u64 {
        return Err(failed(
            op,
            format!(
                "ranks disagree: got op {} step {} call {} with {len} bytes, expected op {op_code} step {step} call {call} with {expect}",
                word(0),
                word(4),
                word(8)
            ),
        ));
    }
    Ok(())
}

fn recv_message(
    stream: &mut TcpStream,
    buf: &mut [u8],
    tag: (u32, u32, u32),
    timeout: Duration,
    op: &'static str,
) -> Result<(), CollectiveError> {
    recv_header(stream, buf.len(), tag, timeout, op)?;
    stream.read_exact(buf).map_err(|e| io_err(op, timeout, &e))
}

/// The chunk to send and the chunk to receive into, two disjoint ranges
/// of `data`.
fn disjoint(
    data: &mut [f32],
    (s0, s1): (usize, usize),
    (r0, r1): (usize, usize),
) -> (&[f32], &mut [f32]) {
    // Either range may be empty when there are fewer elements than ranks.
    if s1 <= r0 {
        let (low, high) = data.split_at_mut(r0);
        (&low[s0..s1], &mut high[..r1 - r0])
    } else {
        let (low, high) = data.split_at_mut(s0);
        (&high[..s1 - s0], &mut low[r0..r1])
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, tensors: &[&Tensor]) -> Result<(), CollectiveError> {
        if self.world <= 1 || tensors.is_empty() {
            return Ok(());
        }
        // One flat f32 buffer (a single "bucket") for all tensors.
        let flat = flatten(tensors).to(tch::Device::Cpu);
        let mut data: Vec<f32> = Vec::try_from(&flat).map_err(|e| failed("all_reduce", e))?;
        self.all_reduce_sum(&mut data)?;
        let scale = 1.0 / self.world as f32;
        for v in &mut data {
            *v *= scale;
        }
        scatter_back(&Tensor::from_slice(&data), tensors);
        Ok(())
    }

    fn broadcast(&mut self, tensors: &[&Tensor]) -> Result<(), CollectiveError> {
        if self.world <= 1 || tensors.is_empty() {
            return Ok(());
        }
        for tensor in tensors {
            let cpu = tensor.to_kind(Kind::Float).flatten(0, -1).to(tch::Device::Cpu);
            let mut data: Vec<f32> = Vec::try_from(&cpu).map_err(|e| failed("broadcast", e))?;
            self.broadcast_bytes(bytemuck::cast_slice_mut(&mut data))?;
            let source = Tensor::from_slice(&data).view(tensor.size().as_slice());
            tch::no_grad(|| {
                let mut target = (*tensor).shallow_clone();
                target.copy_(&source.to_kind(tensor.kind()).to(tensor.device()));
            });
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut token = [1.0f32];
        self.all_reduce_sum(&mut token)?;
        if (token[0] - self.world as f32).abs() > 0.5 {
            return Err(failed("barrier", format!("{} of {} ranks arrived", token[0], self.world)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts `world` ranks on threads and runs `body` on each.
    fn ring<T: Send>(
        world: usize,
        body: impl Fn(TcpRing) -> T + Sync,
    ) -> Vec<Result<T, CollectiveError>> {
        let listeners: Vec<RingListener> =
            (0..world).map(|_| RingListener::bind("127.0.0.1:0").unwrap()).collect();
        let master = listeners[0].local_addr().unwrap();
        std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let body = &body;
                    scope.spawn(move || {
                        let config = RingConfig {
                            rank,
                            world,
                            token: "run-1/1".into(),
                            timeout: Duration::from_secs(10),
                        };
                        TcpRing::connect(&config, listener, Some(master)).map(body)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn ring_all_reduce_sums_exactly() {
        for world in [2, 3, 4] {
            // Values per rank whose sums are exact in f32; 1,001 elements do
            // not split evenly into the chunks.
            let results = ring(world, |mut ring| {
                let rank = ring.rank() as f32;
                let mut data: Vec<f32> = (0..1001).map(|i| i as f32 + rank * 1000.0).collect();
                ring.all_reduce_sum(&mut data).unwrap();
                ring.barrier().unwrap();
                // Fewer elements than ranks: some chunks are empty.
                let mut tiny = vec![rank + 1.0, 2.0];
                ring.all_reduce_sum(&mut tiny).unwrap();
                data.extend(tiny);
                data
            });
            let w = world as f32;
            for data in results {
                let mut data = data.unwrap();
                let tiny = data.split_off(1001);
                assert_eq!(tiny, vec![w * (w + 1.0) / 2.0, 2.0 * w], "world {world}, tiny buffer");
                for (i, v) in data.iter().enumerate() {
                    let expected = w * i as f32 + 1000.0 * w * (w - 1.0) / 2.0;
                    assert_eq!(*v, expected, "world {world}, element {i}");
                }
            }
        }
    }

    #[test]
    fn tensors_are_averaged_and_broadcast_from_rank_0() {
        let results = ring(3, |mut ring| {
            let rank = ring.rank() as f64;
            let a = Tensor::from_slice(&[rank, 2.0 * rank]).to_kind(Kind::Float);
            let b = Tensor::from_slice(&[10.0 + rank]).to_kind(Kind::Float);
            ring.all_reduce_mean(&[&a, &b]).unwrap();
            let c = Tensor::from_slice(&[rank + 5.0, -rank]).to_kind(Kind::Float);
            ring.broadcast(&[&c]).unwrap();
            (
                Vec::<f32>::try_from(&a).unwrap(),
                Vec::<f32>::try_from(&b).unwrap(),
                Vec::<f32>::try_from(&c).unwrap(),
            )
        });
        for result in results {
            let (a, b, c) = result.unwrap();
            assert_eq!(a, vec![1.0, 2.0]);
            assert_eq!(b, vec![11.0]);
            assert_eq!(c, vec![5.0, 0.0]);
        }
    }

    #[test]
    fn a_dead_rank_fails_its_peers_instead_of_hanging() {
        let start = Instant::now();
        let results = ring(2, |mut ring| {
            if ring.rank() == 1 {
                drop(ring);
                return Ok(());
            }
            let mut data = vec![1.0f32; 4096];
            ring.all_reduce_sum(&mut data)
        });
        let err = results[0].as_ref().unwrap().as_ref().unwrap_err();
        assert!(err.to_string().contains("gone") || err.to_string().contains("timed out"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(10), "failed at once, not at the timeout");
    }

    #[test]
    fn a_rank_of_another_attempt_is_refused() {
        let listener = RingListener::bind("127.0.0.1:0").unwrap();
        let master = listener.local_addr().unwrap();
        let timeout = Duration::from_secs(2);
        std::thread::scope(|scope| {
            let zero = scope.spawn(move || {
                let config = RingConfig { rank: 0, world: 2, token: "run-1/2".into(), timeout };
                TcpRing::connect(&config, listener, None)
            });
            let stale = RingListener::bind("127.0.0.1:0").unwrap();
            let config = RingConfig { rank: 1, world: 2, token: "run-1/1".into(), timeout };
            let err = TcpRing::connect(&config, stale, Some(master)).unwrap_err();
            assert!(err.to_string().contains("another attempt"), "{err}");
            let err = zero.join().unwrap().unwrap_err();
            assert!(matches!(err, CollectiveError::Timeout { .. }), "{err}");
        });
    }
}
