//! Worker leases granted to worker processes — the node's side of Ray's
//! `RequestWorkerLease` / `ReturnWorker`, for tasks that code in a worker
//! process submits and owns.
//!
//! # Design
//!
//! A worker process (the lessee) that submits tasks asks for a lease per
//! resource shape (`RequestLease`). The request goes through the node's
//! scheduler as a task would ([`Work::Lease`]): its resources are reserved
//! when it is admitted, and it waits in the queue while none are free.
//! Once admitted, a worker process is leased from the node's pool and its
//! endpoint handed to the lessee (`LeaseGranted`), which pushes its tasks
//! there itself and gets their outcomes straight back; this process is on
//! no task's path. `ReturnLease` gives the worker back to the pool and the
//! resources back to the scheduler.
//!
//! # State
//!
//! * `Leased::leases` of the lessee holds each lease it was granted
//!   ([`Granted`]): the leased worker and the resources reserved. Removing
//!   the entry is what ends a lease, so it ends once whoever removes it
//!   first: the lessee's `ReturnLease`, the lessee's death, the leased
//!   worker's death.
//! * `Leased::lessor` of the leased worker points back to the lessee and
//!   the lease, so the leased worker's death ends it.
//! * The leased worker's CPU is recorded under the lease's id
//!   (`Leased::running_cpu`): a task blocked there reports `Blocked` under
//!   that id, and the CPU is lent to other work meanwhile.
//!
//! # Failure
//!
//! The lessee's death ends its leases and kills their workers (a task of
//! the dead owner may still run there; as in Ray, such workers are not
//! reused). A worker that cannot be had, or a shape no node could ever
//! meet, is answered `LeaseRefused` with the typed error.

use crate::error::{Error, Result};
use crate::ids::TaskId;
use crate::lease::Leased;
use crate::resources::ResourceSet;
use crate::runtime::{Inner, Work};
use crate::wire::Message;
use rustyray_proto::service::NodeManager;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How long a freshly leased worker has to say its endpoint.
const ENDPOINT_TIME: Duration = Duration::from_secs(10);

/// A lease request on its way through the node's scheduler.
#[derive(Debug)]
pub(crate) struct LeaseRun {
    lease_id: TaskId,
    lessee: Weak<Leased>,
    pub(crate) request: ResourceSet,
}

impl LeaseRun {
    /// What the request asks for, as a scheduler names it.
    pub(crate) fn describe(&self) -> String {
        format!("a worker lease for {}", self.request)
    }
}

/// A lease a worker process holds.
#[derive(Debug)]
pub(crate) struct Granted {
    worker: Arc<Leased>,
    request: ResourceSet,
}

/// A worker process asks for a lease (see `Message::RequestLease`).
pub(crate) fn request(rt: &Arc<Inner>, lessee: &Arc<Leased>, lease_id: TaskId, resources: &[(String, f64)]) {
    let request = match shape(resources) {
        Ok(r) => r,
        Err(e) => return refuse(lessee, lease_id, e),
    };
    rt.enqueue(Work::Lease(Box::new(LeaseRun {
        lease_id,
        lessee: Arc::downgrade(lessee),
        request,
    })));
}

/// The request could not be admitted (unschedulable, or shutdown).
pub(crate) fn failed(run: &LeaseRun, error: Error) {
    if let Some(lessee) = run.lessee.upgrade() {
        refuse(&lessee, run.lease_id, error);
    }
}

fn refuse(lessee: &Leased, lease_id: TaskId, error: Error) {
    lessee.send(&Message::LeaseRefused { lease_id, error });
}

/// Leases a worker for an admitted request (its resources are held) and
/// grants it, on the executor: a new worker may have to start, and says
/// its endpoint once it runs.
pub(crate) fn start(rt: &Arc<Inner>, run: Box<LeaseRun>) {
    let Some(node) = rt.mode.node().cloned() else {
        failed(&run, Error::invalid("worker leases need a node daemon"));
        rt.release(&run.request);
        return;
    };
    if run.lessee.upgrade().is_none_or(|l| l.is_dead()) {
        rt.release(&run.request);
        return;
    }
    let rt = rt.clone();
    rt.handle.clone().spawn(async move {
        let leased = match node.try_lease() {
            Ok(Some(w)) => Ok(w),
            Ok(None) => node.lease().await,
            Err(e) => Err(e),
        };
        let ready = match leased {
            Ok(w) => endpoint_of(&w).await.map(|e| (w, e)).map_err(|(w, e)| {
                w.condemn();
                e
            }),
            Err(e) => Err(e),
        };
        match ready {
            Ok((w, endpoint)) => grant(&rt, &*node, w, endpoint, &run),
            Err(e) => {
                failed(&run, e);
                rt.release(&run.request);
            }
        }
    });
}

/// The leased worker's endpoint, once it said it.
async fn endpoint_of(w: &Arc<Leased>) -> std::result::Result<String, (Arc<Leased>, Error)> {
    let wait = async {
        loop {
            let said = w.listening();
            tokio::pin!(said);
            said.as_mut().enable();
            if let Some(e) = w.endpoint() {
                return e.to_owned();
            }
            said.await;
        }
    };
    tokio::select! {
        e = wait => Ok(e),
        () = w.ended() => Err((w.clone(), Error::WorkerStart("the leased worker exited before it listened".to_owned()))),
        () = tokio::time::sleep(ENDPOINT_TIME) => Err((w.clone(), Error::WorkerStart("the leased worker never said its endpoint".to_owned()))),
    }
}

fn grant(rt: &Arc<Inner>, node: &dyn NodeManager<Leased>, w: Arc<Leased>, endpoint: String, run: &LeaseRun) {
    let Some(lessee) = run.lessee.upgrade().filter(|l| !l.is_dead()) else {
        node.give_back(w);
        rt.release(&run.request);
        return;
    };
    let lease_id = run.lease_id;
    w.running_cpu(lease_id, Some(run.request.cpu_only()));
    w.set_lessor(Some((Arc::downgrade(&lessee), lease_id)));
    let pid = w.pid();
    lessee.leases().lock().insert(
        lease_id,
        Granted {
            worker: w,
            request: run.request.clone(),
        },
    );
    // Checked after the entry is in: a lessee that died meanwhile had its
    // leases ended before this one was there.
    if lessee.is_dead()
        || !lessee.send(&Message::LeaseGranted {
            lease_id,
            pid,
            endpoint,
        })
    {
        end(rt, &lessee, lease_id, true);
    }
}

/// Ends lease `lease_id` of `lessee` if it still holds it: the worker goes
/// back to the pool (or is killed, with `kill` or if it died), and the
/// resources back to the scheduler.
pub(crate) fn end(rt: &Arc<Inner>, lessee: &Leased, lease_id: TaskId, kill: bool) {
    let Some(g) = lessee.leases().lock().remove(&lease_id) else {
        return;
    };
    g.worker.set_lessor(None);
    if let Some(cpu) = g.worker.running_cpu(lease_id, None) {
        rt.take_back(&cpu);
    }
    match rt.mode.node() {
        Some(node) if !kill && !g.worker.is_dead() => node.give_back(g.worker),
        _ => g.worker.condemn(),
    }
    rt.release(&g.request);
}

/// Ends every lease `lessee` holds (it died), killing their workers, and
/// drops its requests still queued, so they hold up no one behind them.
pub(crate) fn end_all(rt: &Arc<Inner>, lessee: &Leased) {
    let ids: Vec<TaskId> = lessee.leases().lock().keys().copied().collect();
    for id in ids {
        end(rt, lessee, id, true);
    }
    let its = |w: &Work| matches!(w, Work::Lease(l) if std::ptr::eq(l.lessee.as_ptr(), lessee));
    // Taking one grants it its request, which goes straight back.
    while let Some(w) = rt.sched.take_queued(usize::MAX, its) {
        if let Work::Lease(l) = w {
            rt.release(&l.request);
        }
    }
}

/// A request's resources as a set; an amount out of range is an error.
fn shape(resources: &[(String, f64)]) -> Result<ResourceSet> {
    let mut r = ResourceSet::new();
    for (n, a) in resources {
        r.set(n, *a)?;
    }
    Ok(r)
}
