//! Helpers shared by the integration tests.
#![allow(dead_code, unused_macros)]

use rustyray::{ActorOptionsBuilder, Config, Ray};
use std::time::Duration;

/// A generous timeout for waiting on real events.
pub(crate) const LONG: Duration = Duration::from_secs(60);

/// A runtime with `cpus` CPUs; `bytes` sends everything through bytes.
pub(crate) fn runtime(cpus: f64, bytes: bool) -> Ray {
    rustyray::init_with(
        Config::new()
            .num_cpus(cpus)
            .num_gpus(0.0)
            .serialize_everything(bytes),
    )
    .expect("runtime starts")
}

/// Waits for a condition the test observes (a real event, never a
/// sleep), failing with `what` after [`LONG`].
pub(crate) fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + LONG;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::yield_now();
    }
}

/// Threads of this process whose name starts with `prefix`.
pub(crate) fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .map(|c| c.trim_end().starts_with(prefix))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

/// Defines a test twice: once on the embedded threads path, once with
/// every task, call and object forced through its bytes form.
macro_rules! both_modes {
    ($(#[$m:meta])* fn $name:ident($ray:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn body($ray: &rustyray::Ray) -> rustyray::Result<()> $body
            #[test]
            fn threads() -> rustyray::Result<()> {
                body(&crate::common::runtime(4.0, false))
            }
            #[test]
            fn bytes() -> rustyray::Result<()> {
                let ray = crate::common::runtime(4.0, true);
                assert!(ray.serializes_everything());
                body(&ray)
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use both_modes;

/// A latch actor: `wait()` gives an object that stays pending until
/// `open()` is called. Tests use it to hold tasks at a known point and
/// release them on a real event, never a sleep.
#[rustyray::actor]
pub(crate) struct Latch {
    open: tokio::sync::watch::Sender<bool>,
}

#[rustyray::actor]
impl Latch {
    fn new() -> Self {
        Latch {
            open: tokio::sync::watch::channel(false).0,
        }
    }

    async fn wait(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }

    fn open(&self) {
        self.open.send_replace(true);
    }
}

/// A new latch and a pending object that completes when it opens.
pub(crate) fn latch(ray: &Ray) -> (rustyray::ActorHandle<Latch>, rustyray::ObjectRef<()>) {
    let l = Latch::options().num_cpus(0.0).remote(ray).expect("latch actor");
    let w = l.wait().expect("latch wait");
    (l, w)
}
