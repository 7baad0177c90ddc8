//! The physical limit of a synchronous row in the processes mode: a bare
//! round trip between two processes over the transport the node and its
//! workers use (an abstract Unix socket, one connection per direction,
//! length-prefixed postcard frames, blocking reads on both sides), with no
//! runtime on either side. A sync task or actor call in the processes mode
//! makes one such round trip plus the runtime's work, so this rate bounds
//! those rows as the memcpy reference bounds the put rows.

use rustyray_proto::{self as wire, FrameDecoder, Message};
use std::io::Write;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the peer process may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Flags of the hidden `roundtrip-peer` verb: the peer's side.
#[derive(Debug, Clone, clap::Args)]
pub struct PeerArgs {
    /// The abstract socket name to connect to.
    pub socket: String,
}

/// The peer: connects twice (what it reads, what it writes), answers each
/// `Ping` with a `Pong`, and exits when the connection ends.
pub fn serve_peer(args: &PeerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let addr = SocketAddr::from_abstract_name(args.socket.as_bytes())?;
    let mut down = UnixStream::connect_addr(&addr)?;
    let mut up = UnixStream::connect_addr(&addr)?;
    let mut dec = FrameDecoder::default();
    while let Some(msg) = wire::read_message_blocking(&mut down, &mut dec)? {
        if let Message::Ping { nonce } = msg {
            up.write_all(&wire::encode_frame(&Message::Pong { nonce })?)?;
        }
    }
    Ok(())
}

/// The peer process, killed and reaped when dropped.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Round trips per second for `secs` seconds (after a short warm-up), with
/// this executable started again as the peer.
pub fn measure(secs: f64) -> Result<f64, Box<dyn std::error::Error>> {
    let name = format!("rustyray-roundtrip-{}-{:x}", std::process::id(), nonce());
    let listener = UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
    listener.set_nonblocking(true)?;
    let mut peer = Peer(
        Command::new(std::env::current_exe()?)
            .args(["roundtrip-peer", &name])
            .stdin(Stdio::null())
            .spawn()?,
    );
    let mut down = accept(&listener, &mut peer)?;
    let mut up = accept(&listener, &mut peer)?;
    let mut dec = FrameDecoder::default();
    let mut round_trip = |nonce: u64| -> Result<(), Box<dyn std::error::Error>> {
        down.write_all(&wire::encode_frame(&Message::Ping { nonce })?)?;
        match wire::read_message_blocking(&mut up, &mut dec)? {
            Some(Message::Pong { nonce: n }) if n == nonce => Ok(()),
            other => Err(format!("the peer answered {other:?}").into()),
        }
    };
    for n in 0..1000 {
        round_trip(n)?;
    }
    let start = Instant::now();
    let mut n = 0_u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            round_trip(n)?;
            n += 1;
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Accepts the peer's next connection, or fails if it exits or stalls.
fn accept(listener: &UnixListener, peer: &mut Peer) -> Result<UnixStream, Box<dyn std::error::Error>> {
    let began = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = peer.0.try_wait()? {
                    return Err(format!("the round-trip peer exited ({status})").into());
                }
                if began.elapsed() > CONNECT_TIMEOUT {
                    return Err("the round-trip peer did not connect".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A number that tells this run's socket apart from another's.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}
