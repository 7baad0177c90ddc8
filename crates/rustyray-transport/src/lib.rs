//! Connections between RustyRay processes — Ray's `src/ray/rpc`, as one
//! seam with three implementations.
//!
//! Every role (owner, worker, node daemon, later the control service)
//! reaches another through an [`Address`] and talks over a [`Conn`], a
//! blocking byte stream that carries `rustyray-proto` frames. What is
//! behind it is chosen by the address, in one place:
//!
//! * [`Address::Unix`] — a Unix socket in the abstract namespace (nothing
//!   on the file system to leave behind); the kernel tells who the peer
//!   is ([`Conn::peer_pid`]). A node and its worker processes use it.
//! * [`Address::Tcp`] — TCP, for nodes on other machines (the cluster);
//!   the peer proves itself with the cluster's token in the handshake.
//! * [`Address::Memory`] — a pair of in-process pipes on a [`MemoryNet`],
//!   for tests and for roles run in one process: no socket at all.
//!
//! One conformance suite (`tests/conformance.rs`) runs against each.
//!
//! ```
//! use rustyray_transport::{Address, MemoryNet};
//! use std::io::{Read, Write};
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! # rt.block_on(async {
//! let net = MemoryNet::new();
//! let listener = net.bind("node")?;
//! let mut client = net.connect("node")?;
//! let mut server = listener.accept().await?;
//! client.write_all(b"ping")?;
//! let mut buf = [0_u8; 4];
//! server.read_exact(&mut buf)?;
//! assert_eq!(&buf, b"ping");
//! # Ok::<(), std::io::Error>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Failure
//!
//! Every operation returns `std::io::Error`; a peer that goes away shows as
//! a read returning 0 (end of stream) or an error, never as a hang: reads
//! may carry a timeout ([`Conn::set_read_timeout`]) and [`Conn::shutdown`]
//! wakes a reader blocked on the same connection.

#![forbid(unsafe_code)]

mod memory;

pub use memory::MemoryNet;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Where a listener is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A Unix socket in the abstract namespace, by name.
    Unix(String),
    /// A TCP address.
    Tcp(SocketAddr),
    /// A listener on a [`MemoryNet`], by name.
    Memory(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(name) => write!(f, "unix:@{name}"),
            Address::Tcp(addr) => write!(f, "tcp:{addr}"),
            Address::Memory(name) => write!(f, "memory:{name}"),
        }
    }
}

/// A connection: a blocking byte stream. One thread reads it; writers
/// share a clone ([`Conn::try_clone`]) and write whole frames under their
/// own lock.
#[derive(Debug)]
pub struct Conn(ConnKind);

#[derive(Debug)]
enum ConnKind {
    /// With the peer's pid, when known (the accepting side).
    Unix(UnixStream, Option<u32>),
    Tcp(TcpStream),
    Memory(memory::Pipe),
}

impl Conn {
    /// Connects to a Unix or TCP address (a memory address is reached
    /// through its [`MemoryNet`]).
    pub fn connect(addr: &Address) -> io::Result<Conn> {
        match addr {
            Address::Unix(name) => {
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                Ok(Conn(ConnKind::Unix(UnixStream::connect_addr(&addr)?, None)))
            }
            Address::Tcp(addr) => {
                let s = TcpStream::connect(addr)?;
                // Frames are written whole; waiting to fill a segment only
                // adds latency.
                s.set_nodelay(true)?;
                Ok(Conn(ConnKind::Tcp(s)))
            }
            Address::Memory(name) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("memory address {name} is reached through its MemoryNet"),
            )),
        }
    }

    /// A second handle on the same connection (for a reader thread and
    /// writers apart).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn(match &self.0 {
            ConnKind::Unix(s, pid) => ConnKind::Unix(s.try_clone()?, *pid),
            ConnKind::Tcp(s) => ConnKind::Tcp(s.try_clone()?),
            ConnKind::Memory(p) => ConnKind::Memory(p.clone()),
        }))
    }

    /// Closes both directions: the peer reads the end of the stream, and a
    /// reader blocked on this connection wakes.
    pub fn shutdown(&self) -> io::Result<()> {
        match &self.0 {
            ConnKind::Unix(s, _) => s.shutdown(std::net::Shutdown::Both),
            ConnKind::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            ConnKind::Memory(p) => {
                p.shutdown();
                Ok(())
            }
        }
    }

    /// Bounds how long a read waits (`None`: forever); a read that times
    /// out fails with `WouldBlock` or `TimedOut`.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.0 {
            ConnKind::Unix(s, _) => s.set_read_timeout(timeout),
            ConnKind::Tcp(s) => s.set_read_timeout(timeout),
            ConnKind::Memory(p) => p.set_read_timeout(timeout),
        }
    }

    /// The peer's process id as the kernel reported it (`SO_PEERCRED`)
    /// when a Unix listener accepted the connection; `None` on the
    /// connecting side and for the other transports, whose peers prove who
    /// they are with the token alone.
    pub fn peer_pid(&self) -> Option<u32> {
        match &self.0 {
            ConnKind::Unix(_, pid) => *pid,
            ConnKind::Tcp(_) | ConnKind::Memory(_) => None,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.0 {
            ConnKind::Unix(s, _) => (&*s).read(buf),
            ConnKind::Tcp(s) => (&*s).read(buf),
            ConnKind::Memory(p) => p.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.0 {
            ConnKind::Unix(s, _) => (&*s).write(buf),
            ConnKind::Tcp(s) => (&*s).write(buf),
            ConnKind::Memory(p) => p.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Accepts connections on an [`Address`].
#[derive(Debug)]
pub struct Listener(ListenerKind);

#[derive(Debug)]
enum ListenerKind {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
    Memory(memory::Incoming),
}

impl Listener {
    /// Listens on a Unix or TCP address (TCP port 0 picks a free port; see
    /// [`Listener::address`]). Must be called inside a tokio runtime with
    /// I/O enabled.
    pub fn bind(addr: &Address) -> io::Result<Listener> {
        match addr {
            Address::Unix(name) => {
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
                l.set_nonblocking(true)?;
                Ok(Listener(ListenerKind::Unix(tokio::net::UnixListener::from_std(
                    l,
                )?)))
            }
            Address::Tcp(addr) => {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(Listener(ListenerKind::Tcp(tokio::net::TcpListener::from_std(l)?)))
            }
            Address::Memory(name) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("memory address {name} is bound through its MemoryNet"),
            )),
        }
    }

    /// The address peers connect to.
    pub fn address(&self) -> io::Result<Address> {
        match &self.0 {
            ListenerKind::Unix(l) => {
                let addr = l.local_addr()?;
                let name = std::os::unix::net::SocketAddr::from(addr)
                    .as_abstract_name()
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .ok_or_else(|| io::Error::other("a Unix listener without an abstract name"))?;
                Ok(Address::Unix(name))
            }
            ListenerKind::Tcp(l) => Ok(Address::Tcp(l.local_addr()?)),
            ListenerKind::Memory(i) => Ok(Address::Memory(i.name().to_owned())),
        }
    }

    /// The next connection, blocking once accepted. Accepting never reads
    /// from the connection: what it may cost before it proves itself is
    /// the caller's to bound (see the node daemon's handshake limits).
    pub async fn accept(&self) -> io::Result<Conn> {
        match &self.0 {
            ListenerKind::Unix(l) => {
                let (s, _) = l.accept().await?;
                let pid = s
                    .peer_cred()
                    .ok()
                    .and_then(|c| c.pid())
                    .and_then(|p| u32::try_from(p).ok());
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                Ok(Conn(ConnKind::Unix(s, pid)))
            }
            ListenerKind::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Conn(ConnKind::Tcp(s)))
            }
            ListenerKind::Memory(i) => i.accept().await.map(|p| Conn(ConnKind::Memory(p))),
        }
    }
}
