//! In-process connections: two bounded byte pipes per connection, on a
//! [`MemoryNet`] that names listeners. No socket and no global state: each
//! net is a value, and only what holds it can reach its listeners.
//!
//! # Design
//!
//! A connection is two [`Half`]s, one per direction, each a bounded buffer
//! under a mutex with a condition variable. A reader waits for bytes, the
//! end of the stream or its timeout; a writer waits for room, so a fast
//! writer is held back as a socket's would be. Every clone of one side
//! shares an [`End`]; when the last goes, both halves close, and the peer
//! reads the end of the stream.

use crate::{Conn, ConnKind, Listener, ListenerKind};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How many bytes one direction buffers before a writer waits.
const CAPACITY: usize = 4 << 20;

/// A set of in-process listeners, by name. Clones share the set.
#[derive(Debug, Clone, Default)]
pub struct MemoryNet {
    listeners: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Pipe>>>>,
}

impl MemoryNet {
    /// An empty net.
    pub fn new() -> MemoryNet {
        MemoryNet::default()
    }

    /// Two ends of one in-process connection, with no listener.
    pub fn pair() -> (Conn, Conn) {
        let (a, b) = Pipe::pair();
        (Conn(ConnKind::Memory(a)), Conn(ConnKind::Memory(b)))
    }

    /// Listens on `name`; fails with `AddrInUse` if a listener has it.
    pub fn bind(&self, name: &str) -> io::Result<Listener> {
        let mut listeners = self.listeners.lock();
        if listeners.get(name).is_some_and(|tx| !tx.is_closed()) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("memory address {name} is in use"),
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        listeners.insert(name.to_owned(), tx);
        Ok(Listener(ListenerKind::Memory(Incoming {
            name: name.to_owned(),
            rx: tokio::sync::Mutex::new(rx),
            net: self.clone(),
        })))
    }

    /// Connects to the listener on `name`; fails with `ConnectionRefused`
    /// if there is none.
    pub fn connect(&self, name: &str) -> io::Result<Conn> {
        let refused = || {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("nothing listens on memory address {name}"),
            )
        };
        let listeners = self.listeners.lock();
        let tx = listeners.get(name).ok_or_else(refused)?;
        let (ours, theirs) = Pipe::pair();
        tx.send(theirs).map_err(|_| refused())?;
        Ok(Conn(ConnKind::Memory(ours)))
    }
}

/// A memory listener's queue of connections waiting to be accepted.
#[derive(Debug)]
pub(crate) struct Incoming {
    name: String,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Pipe>>,
    net: MemoryNet,
}

impl Incoming {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) async fn accept(&self) -> io::Result<Pipe> {
        self.rx
            .lock()
            .await
            .recv()
            .await
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the memory net is gone"))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.net.listeners.lock().remove(&self.name);
    }
}

/// One direction of a connection.
#[derive(Debug, Default)]
struct Half {
    state: Mutex<HalfState>,
    /// Woken when bytes arrive, room frees, or the half closes.
    cv: Condvar,
}

#[derive(Debug, Default)]
struct HalfState {
    bytes: VecDeque<u8>,
    closed: bool,
}

impl Half {
    fn close(&self) {
        self.state.lock().closed = true;
        self.cv.notify_all();
    }
}

/// Closes both halves when the last handle on one side goes.
#[derive(Debug)]
struct End {
    rx: Arc<Half>,
    tx: Arc<Half>,
}

impl Drop for End {
    fn drop(&mut self) {
        self.rx.close();
        self.tx.close();
    }
}

/// One side of an in-process connection.
#[derive(Debug, Clone)]
pub(crate) struct Pipe {
    rx: Arc<Half>,
    tx: Arc<Half>,
    _end: Arc<End>,
    read_timeout: Arc<Mutex<Option<Duration>>>,
}

impl Pipe {
    fn pair() -> (Pipe, Pipe) {
        let (a, b) = (Arc::new(Half::default()), Arc::new(Half::default()));
        let side = |rx: &Arc<Half>, tx: &Arc<Half>| Pipe {
            rx: rx.clone(),
            tx: tx.clone(),
            _end: Arc::new(End {
                rx: rx.clone(),
                tx: tx.clone(),
            }),
            read_timeout: Arc::default(),
        };
        (side(&a, &b), side(&b, &a))
    }

    pub(crate) fn shutdown(&self) {
        self.rx.close();
        self.tx.close();
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        // As sockets do: a zero timeout is refused, not taken as none.
        if timeout == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a zero read timeout"));
        }
        *self.read_timeout.lock() = timeout;
        Ok(())
    }

    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self
            .read_timeout
            .lock()
            .and_then(|t| Instant::now().checked_add(t));
        let mut s = self.rx.state.lock();
        while s.bytes.is_empty() && !s.closed {
            match deadline {
                None => self.rx.cv.wait(&mut s),
                Some(at) => {
                    if self.rx.cv.wait_until(&mut s, at).timed_out() && s.bytes.is_empty() && !s.closed {
                        return Err(io::Error::new(io::ErrorKind::WouldBlock, "read timed out"));
                    }
                }
            }
        }
        let n = buf.len().min(s.bytes.len());
        for (dst, src) in buf.iter_mut().zip(s.bytes.drain(..n)) {
            *dst = src;
        }
        drop(s);
        // A writer may wait for the room just made.
        self.rx.cv.notify_all();
        Ok(n)
    }

    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut s = self.tx.state.lock();
        loop {
            if s.closed {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the peer closed the connection",
                ));
            }
            let room = CAPACITY - s.bytes.len().min(CAPACITY);
            if room > 0 {
                let n = room.min(buf.len());
                s.bytes.extend(&buf[..n]);
                drop(s);
                self.tx.cv.notify_all();
                return Ok(n);
            }
            self.tx.cv.wait(&mut s);
        }
    }
}
