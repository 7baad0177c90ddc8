//! Runtimes as values: several per process, ordered shutdown, no thread
//! outliving its runtime.

mod common;
use common::{threads_named, LONG};
use rustyray::prelude::*;

#[rustyray::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[rustyray::remote]
async fn add_async(a: i64, b: i64) -> i64 {
    a + b
}

#[rustyray::remote]
fn try_shutdown() -> String {
    match rustyray::current().expect("task").shutdown() {
        Err(e) => e.to_string(),
        Ok(()) => "shut down from inside".to_owned(),
    }
}

#[rustyray::remote]
fn block_on(gate: ObjectRef<()>) -> String {
    match rustyray::current().expect("task").get(&gate) {
        Err(e) => e.to_string(),
        Ok(()) => "opened".to_owned(),
    }
}

/// `block_on`, after it says it started.
#[rustyray::remote]
fn block_on_after(gate: ObjectRef<()>, started: rustyray::ActorHandle<common::Latch>) -> String {
    let ray = rustyray::current().expect("task");
    let _ = started.open().map(|r| ray.get(&r));
    match ray.get(&gate) {
        Err(e) => e.to_string(),
        Ok(()) => "opened".to_owned(),
    }
}

#[rustyray::actor]
struct Keeper {
    n: u64,
}

#[rustyray::actor]
impl Keeper {
    fn new() -> Self {
        Keeper { n: 0 }
    }

    async fn bump(&mut self) -> u64 {
        self.n += 1;
        self.n
    }
}

fn exercise(ray: &Ray) -> rustyray::Result<()> {
    let refs: Vec<_> = (0..50)
        .map(|i| add::remote(ray, i, 1))
        .collect::<Result<_, _>>()?;
    let arefs: Vec<_> = (0..50)
        .map(|i| add_async::remote(ray, i, 1))
        .collect::<Result<_, _>>()?;
    assert_eq!(ray.get_many(&refs)?, ray.get_many(&arefs)?);
    let k = Keeper::remote(ray)?;
    for _ in 0..10 {
        k.bump()?;
    }
    assert_eq!(ray.get(&k.bump()?)?, 11);
    Ok(())
}

#[test]
fn shutdown_joins_every_thread() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let prefix = ray.thread_prefix().to_owned();
    exercise(&ray)?;
    assert!(threads_named(&prefix) > 0);
    ray.shutdown()?;
    assert_eq!(threads_named(&prefix), 0, "threads of {prefix} outlived shutdown");
    // Calls after shutdown fail cleanly.
    assert!(matches!(add::remote(&ray, 1, 2), Err(Error::Shutdown)));
    assert!(matches!(ray.put(1_u8), Err(Error::Shutdown)));
    // Shutting down twice is harmless.
    ray.shutdown()?;
    Ok(())
}

#[test]
fn dropping_the_last_handle_shuts_down() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let prefix = ray.thread_prefix().to_owned();
    let clone = ray.clone();
    exercise(&clone)?;
    drop(ray);
    // A clone keeps it up.
    assert_eq!(clone.get(&add::remote(&clone, 1, 1)?)?, 2);
    let leftover = add::remote(&clone, 2, 2)?;
    let _ = clone.get(&leftover)?;
    drop(clone);
    assert_eq!(
        threads_named(&prefix),
        0,
        "threads of {prefix} outlived the last handle"
    );
    Ok(())
}

#[test]
fn shutdown_wakes_blocked_tasks_and_readers() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let prefix = ray.thread_prefix().to_owned();
    let (_latch, gate) = common::latch(&ray);
    let (started, started_gate) = common::latch(&ray);
    let blocked = block_on_after::remote(&ray, gate.clone(), started)?;
    let reader = {
        let ray = ray.clone();
        let gate = gate.clone();
        std::thread::spawn(move || ray.get_timeout(&gate, LONG))
    };
    // The task runs (and goes on to block in get) before shutting down.
    ray.get_timeout(&started_gate, LONG)?;
    ray.shutdown()?;
    // Woken by the shutdown: as such, or through the latch call it waited
    // for, which the shutdown ends first (its actor stops, or the call is
    // dropped) when that happens before the store fails what is pending.
    let woke = reader.join().expect("join");
    assert!(
        matches!(
            &woke,
            Err(Error::Shutdown | Error::TaskCancelled(_)) | Err(Error::ActorDied { cause: Some(_), .. })
        ),
        "{woke:?}"
    );
    if let Err(Error::ActorDied {
        cause: Some(cause), ..
    }) = &woke
    {
        assert!(matches!(**cause, Error::Shutdown), "{woke:?}");
    }
    assert!(matches!(ray.get(&blocked), Err(Error::Shutdown)));
    assert_eq!(threads_named(&prefix), 0);
    Ok(())
}

#[test]
fn shutdown_from_inside_a_task_is_refused() -> rustyray::Result<()> {
    let ray = common::runtime(1.0, false);
    let msg = ray.get(&try_shutdown::remote(&ray)?)?;
    assert!(msg.contains("cannot be called from inside"), "{msg}");
    Ok(())
}

#[test]
fn runtimes_are_independent() -> rustyray::Result<()> {
    let a = common::runtime(1.0, false);
    let b = common::runtime(1.0, true);
    let x = a.put(5_i64)?;
    // A reference of one runtime is refused by another.
    assert!(matches!(b.get(&x), Err(Error::InvalidArgument(_))));
    assert!(matches!(add::remote(&b, &x, 1), Err(Error::InvalidArgument(_))));
    // Shutting one down leaves the other running.
    a.shutdown()?;
    exercise(&b)?;
    assert!(matches!(a.get(&x), Err(Error::Shutdown)));
    Ok(())
}

#[test]
fn many_runtimes_in_parallel_threads() -> rustyray::Result<()> {
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || -> rustyray::Result<()> {
                let ray = common::runtime(2.0, i % 2 == 1);
                exercise(&ray)
            })
        })
        .collect();
    for h in handles {
        h.join().expect("join")?;
    }
    Ok(())
}

#[test]
fn concurrent_shutdowns_all_return_after_it_finished() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let prefix = ray.thread_prefix().to_owned();
    exercise(&ray)?;
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let ray = ray.clone();
            let prefix = prefix.clone();
            std::thread::spawn(move || -> rustyray::Result<usize> {
                ray.shutdown()?;
                Ok(threads_named(&prefix))
            })
        })
        .collect();
    for c in callers {
        assert_eq!(
            c.join().expect("join")?,
            0,
            "a shutdown returned before the threads were joined"
        );
    }
    Ok(())
}
