//! One conformance suite, run against every transport (Unix sockets in
//! the abstract namespace, TCP on loopback, in-memory pipes): what the
//! roles above rely on, each a test per transport.

use rustyray_proto::{self as proto, FrameDecoder, Message, Role};
use rustyray_transport::{Address, Conn, Listener, MemoryNet};
use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

/// A generous bound on anything a test waits for.
const LONG: Duration = Duration::from_secs(60);

/// What a test needs of a transport: a listener, and a way to reach it.
trait Transport {
    /// Whether accepted connections know the peer's process id.
    const KNOWS_PEER: bool;
    fn listen(&self) -> Listener;
    fn connect(&self, to: &Listener) -> std::io::Result<Conn>;
    /// An address nothing listens on, reached the same way.
    fn connect_to_nothing(&self) -> std::io::Result<Conn>;
}

/// A unique name for a listener of this test process.
fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "rr-conformance-{}-{tag}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

struct Unix;

impl Transport for Unix {
    const KNOWS_PEER: bool = true;
    fn listen(&self) -> Listener {
        Listener::bind(&Address::Unix(unique("unix"))).expect("bind")
    }
    fn connect(&self, to: &Listener) -> std::io::Result<Conn> {
        Conn::connect(&to.address()?)
    }
    fn connect_to_nothing(&self) -> std::io::Result<Conn> {
        Conn::connect(&Address::Unix(unique("nothing")))
    }
}

struct Tcp;

impl Transport for Tcp {
    const KNOWS_PEER: bool = false;
    fn listen(&self) -> Listener {
        Listener::bind(&Address::Tcp(([127, 0, 0, 1], 0).into())).expect("bind")
    }
    fn connect(&self, to: &Listener) -> std::io::Result<Conn> {
        Conn::connect(&to.address()?)
    }
    fn connect_to_nothing(&self) -> std::io::Result<Conn> {
        // A port just freed: nothing listens there now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        Conn::connect(&Address::Tcp(port))
    }
}

struct Memory(MemoryNet);

impl Transport for Memory {
    const KNOWS_PEER: bool = false;
    fn listen(&self) -> Listener {
        self.0.bind(&unique("memory")).expect("bind")
    }
    fn connect(&self, to: &Listener) -> std::io::Result<Conn> {
        match to.address()? {
            Address::Memory(name) => self.0.connect(&name),
            other => panic!("a memory listener at {other}"),
        }
    }
    fn connect_to_nothing(&self) -> std::io::Result<Conn> {
        self.0.connect(&unique("nothing"))
    }
}

/// A connected pair: (the connecting side, the accepted side).
async fn pair<T: Transport>(t: &T, l: &Listener) -> (Conn, Conn) {
    let client = t.connect(l).expect("connect");
    let server = tokio::time::timeout(LONG, l.accept())
        .await
        .expect("accept in time")
        .expect("accept");
    (client, server)
}

async fn frames_cross_both_ways<T: Transport>(t: T) {
    let l = t.listen();
    let (mut c, mut s) = pair(&t, &l).await;
    let server = std::thread::spawn(move || {
        let mut dec = FrameDecoder::default();
        while let Some(msg) = proto::read_message_blocking(&mut s, &mut dec).expect("read") {
            if let Message::Ping { nonce } = msg {
                s.write_all(&proto::encode_frame(&Message::Pong { nonce }).expect("frame"))
                    .expect("write");
            }
        }
    });
    let mut dec = FrameDecoder::default();
    for nonce in 0..200 {
        c.write_all(&proto::encode_frame(&Message::Ping { nonce }).expect("frame"))
            .expect("write");
        let answer = proto::read_message_blocking(&mut c, &mut dec).expect("read");
        assert_eq!(answer, Some(Message::Pong { nonce }));
    }
    drop(c);
    server.join().expect("server");
}

async fn large_writes_arrive_whole_and_in_order<T: Transport>(t: T) {
    let l = t.listen();
    let (mut c, mut s) = pair(&t, &l).await;
    let sent: Vec<u8> = (0..16 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let expected = sent.clone();
    // More than any buffer between the two: the writer must wait for the
    // reader, not grow without bound or fail.
    let writer = std::thread::spawn(move || {
        c.write_all(&sent).expect("write");
    });
    let mut got = vec![0_u8; expected.len()];
    s.read_exact(&mut got).expect("read");
    writer.join().expect("writer");
    assert!(got == expected, "the bytes arrived changed or out of order");
}

async fn the_end_of_one_side_is_the_end_of_the_others_reads<T: Transport>(t: T) {
    let l = t.listen();
    let (c, mut s) = pair(&t, &l).await;
    (&c).write_all(b"last words").expect("write");
    drop(c);
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read to the end");
    assert_eq!(got, b"last words");
    // And a write to a peer that is gone fails rather than hangs.
    let mut failed = false;
    for _ in 0..64 {
        if (&s).write_all(&[0_u8; 65_536]).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "writes to a closed peer kept succeeding");
}

async fn shutdown_wakes_a_blocked_reader<T: Transport>(t: T) {
    let l = t.listen();
    let (_c, s) = pair(&t, &l).await;
    let reader_side = s.try_clone().expect("clone");
    let reader = std::thread::spawn(move || {
        let mut buf = [0_u8; 16];
        (&reader_side).read(&mut buf)
    });
    s.shutdown().expect("shutdown");
    match reader.join().expect("reader") {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("a reader of a shut connection read {n} bytes"),
    }
}

async fn a_read_timeout_ends_a_read_with_nothing_to_read<T: Transport>(t: T) {
    let l = t.listen();
    let (_c, s) = pair(&t, &l).await;
    s.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("timeout");
    let mut buf = [0_u8; 1];
    match (&s).read(&mut buf) {
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{e:?}"
        ),
        Ok(n) => panic!("read {n} bytes from a silent peer"),
    }
}

async fn a_zero_read_timeout_is_refused<T: Transport>(t: T) {
    let l = t.listen();
    let (_c, s) = pair(&t, &l).await;
    let refused = s.set_read_timeout(Some(Duration::ZERO));
    assert!(
        matches!(refused, Err(ref e) if e.kind() == ErrorKind::InvalidInput),
        "{refused:?}"
    );
}

async fn the_handshake_admits_the_token_and_refuses_any_other<T: Transport>(t: T) {
    let l = t.listen();
    let token = 0x5eed_u128 << 64 | 0xfeed;
    for (theirs, admitted) in [(token, true), (token ^ 1, false)] {
        let (mut c, mut s) = pair(&t, &l).await;
        let server = std::thread::spawn(move || {
            let mut dec = FrameDecoder::new(256);
            proto::accept_handshake_blocking(&mut s, &mut dec, token)
        });
        let mut dec = FrameDecoder::default();
        let client = proto::connect_handshake_blocking(&mut c, &mut dec, Role::Worker, theirs);
        let server = server.join().expect("server");
        assert_eq!(client.is_ok(), admitted, "{client:?}");
        assert_eq!(server.is_ok(), admitted, "{server:?}");
        if let Ok((role, pid)) = server {
            assert_eq!(role, Role::Worker);
            assert_eq!(pid, std::process::id());
        }
    }
}

async fn many_connections_at_once<T: Transport>(t: T) {
    let l = t.listen();
    let mut clients = Vec::new();
    for _ in 0..32 {
        clients.push(t.connect(&l).expect("connect"));
    }
    let mut servers = Vec::new();
    for _ in 0..32 {
        servers.push(
            tokio::time::timeout(LONG, l.accept())
                .await
                .expect("in time")
                .expect("accept"),
        );
    }
    for (i, c) in clients.iter().enumerate() {
        (&*c).write_all(&[i as u8]).expect("write");
    }
    // Each accepted connection carries exactly one client's byte.
    let mut seen: Vec<u8> = servers
        .iter()
        .map(|s| {
            let mut b = [0_u8; 1];
            (&*s).read_exact(&mut b).expect("read");
            b[0]
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..32).collect::<Vec<u8>>());
}

async fn connecting_to_nothing_is_refused<T: Transport>(t: T) {
    match t.connect_to_nothing() {
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound),
            "{e:?}"
        ),
        Ok(_) => panic!("connected to an address nothing listens on"),
    }
}

async fn the_accepting_side_knows_its_peer_where_the_kernel_tells<T: Transport>(t: T) {
    let l = t.listen();
    let (c, s) = pair(&t, &l).await;
    assert_eq!(c.peer_pid(), None, "the connecting side is not told");
    let expected = T::KNOWS_PEER.then_some(std::process::id());
    assert_eq!(s.peer_pid(), expected);
}

/// Instantiates every conformance test for one transport.
macro_rules! conformance {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            conformance!(@tests $make;
                frames_cross_both_ways,
                large_writes_arrive_whole_and_in_order,
                the_end_of_one_side_is_the_end_of_the_others_reads,
                shutdown_wakes_a_blocked_reader,
                a_read_timeout_ends_a_read_with_nothing_to_read,
                a_zero_read_timeout_is_refused,
                the_handshake_admits_the_token_and_refuses_any_other,
                many_connections_at_once,
                connecting_to_nothing_is_refused,
                the_accepting_side_knows_its_peer_where_the_kernel_tells,
            );
        }
    };
    (@tests $make:expr; $($test:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test($make).await;
            }
        )*
    };
}

conformance!(unix, Unix);
conformance!(tcp, Tcp);
conformance!(memory, Memory(MemoryNet::new()));
