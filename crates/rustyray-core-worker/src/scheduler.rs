//! The local scheduler — Ray's `ClusterTaskManager` / `LocalTaskManager`
//! for one node.
//!
//! Work whose dependencies are ready waits here until its resources fit.
//! Queues are kept per resource shape (Ray's scheduling classes) and served
//! round-robin, FIFO within a shape, so a large request at the head of one
//! queue cannot hold back smaller ones. A request that exceeds the node's
//! total can never run and is rejected at once.
//!
//! Methods return the work that became runnable; the caller starts it after
//! the lock is released.

use crate::resources::ResourceSet;
use parking_lot::Mutex;
use std::collections::VecDeque;

/// Something the scheduler can hold: it declares its resource request.
pub(crate) trait Schedulable {
    fn request(&self) -> &ResourceSet;
}

struct State<W> {
    available: ResourceSet,
    queues: Vec<(ResourceSet, VecDeque<W>)>,
    cursor: usize,
    closed: bool,
}

pub(crate) struct Scheduler<W> {
    total: ResourceSet,
    state: Mutex<State<W>>,
}

impl<W> std::fmt::Debug for Scheduler<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("total", &self.total)
            .field("available", &self.state.lock().available)
            .finish()
    }
}

/// Why work was not accepted.
pub(crate) enum Rejected<W> {
    /// The request exceeds the node's total resources.
    Infeasible(W),
    /// The scheduler is closed (the runtime is shutting down).
    Closed(W),
}

impl<W: Schedulable> Scheduler<W> {
    pub(crate) fn new(total: ResourceSet) -> Self {
        Scheduler {
            state: Mutex::new(State {
                available: total.clone(),
                queues: Vec::new(),
                cursor: 0,
                closed: false,
            }),
            total,
        }
    }

    pub(crate) fn total(&self) -> &ResourceSet {
        &self.total
    }

    pub(crate) fn available(&self) -> ResourceSet {
        self.state.lock().available.clone()
    }

    /// Queues `work`, returning what can start now.
    pub(crate) fn submit(&self, work: W) -> Result<Vec<W>, Rejected<W>> {
        if !work.request().fits_in(&self.total) {
            return Err(Rejected::Infeasible(work));
        }
        let mut s = self.state.lock();
        if s.closed {
            return Err(Rejected::Closed(work));
        }
        // Fast path: nothing of this shape waits and it fits now.
        let shape_idx = s.queues.iter().position(|(r, _)| r == work.request());
        let queued = shape_idx.is_some_and(|i| !s.queues[i].1.is_empty());
        if !queued && work.request().fits_in(&s.available) {
            let req = work.request().clone();
            s.available.sub(&req);
            return Ok(vec![work]);
        }
        match shape_idx {
            Some(i) => s.queues[i].1.push_back(work),
            None => {
                let req = work.request().clone();
                s.queues.push((req, VecDeque::from([work])));
            }
        }
        Ok(Self::drain(&mut s))
    }

    /// Returns resources and hands back what can start now.
    pub(crate) fn release(&self, res: &ResourceSet) -> Vec<W> {
        if res.is_empty() {
            return Vec::new();
        }
        let mut s = self.state.lock();
        s.available.add(res);
        Self::drain(&mut s)
    }

    /// Takes resources unconditionally (a blocked task resuming).
    pub(crate) fn take(&self, res: &ResourceSet) {
        self.state.lock().available.sub(res);
    }

    fn drain(s: &mut State<W>) -> Vec<W> {
        let mut out = Vec::new();
        if s.closed {
            return out;
        }
        let n = s.queues.len();
        let mut stalled = 0;
        while n > 0 && stalled < n {
            let i = s.cursor % n;
            s.cursor = s.cursor.wrapping_add(1);
            let State {
                available, queues, ..
            } = &mut *s;
            let (req, q) = &mut queues[i];
            if !q.is_empty() && req.fits_in(available) {
                available.sub(req);
                if let Some(w) = q.pop_front() {
                    out.push(w);
                }
                stalled = 0;
            } else {
                stalled += 1;
            }
        }
        s.queues.retain(|(_, q)| !q.is_empty());
        out
    }

    /// Takes the first item `want` accepts among the last `scan` of each
    /// queue, granting it its request (even beyond what is available: it
    /// runs on resources its taker lends back, see `Inner::help`).
    pub(crate) fn take_queued(&self, scan: usize, want: impl Fn(&W) -> bool) -> Option<W> {
        let mut s = self.state.lock();
        let State {
            available, queues, ..
        } = &mut *s;
        let (req, q, at) = queues.iter_mut().find_map(|(req, q)| {
            let len = q.len();
            let at = q.iter().rev().take(scan).position(&want)?;
            Some((req, q, len - 1 - at))
        })?;
        let w = q.remove(at)?;
        available.sub(req);
        s.queues.retain(|(_, q)| !q.is_empty());
        Some(w)
    }

    /// Closes the scheduler and returns everything still queued.
    pub(crate) fn close(&self) -> Vec<W> {
        let mut s = self.state.lock();
        s.closed = true;
        s.queues.drain(..).flat_map(|(_, q)| q).collect()
    }

    /// How many items wait for resources.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.state.lock().queues.iter().map(|(_, q)| q.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::CPU;

    struct W(ResourceSet, u32);
    impl Schedulable for W {
        fn request(&self) -> &ResourceSet {
            &self.0
        }
    }
    fn cpus(n: f64) -> ResourceSet {
        let mut r = ResourceSet::new();
        r.set(CPU, n).unwrap();
        r
    }

    #[test]
    fn waits_until_resources_fit_and_serves_shapes_round_robin() {
        let s = Scheduler::new(cpus(2.0));
        let started = |v: Vec<W>| v.into_iter().map(|w| w.1).collect::<Vec<_>>();
        assert_eq!(started(s.submit(W(cpus(2.0), 1)).ok().unwrap()), vec![1]);
        assert!(started(s.submit(W(cpus(2.0), 2)).ok().unwrap()).is_empty());
        assert!(started(s.submit(W(cpus(0.5), 3)).ok().unwrap()).is_empty());
        assert_eq!(s.queued(), 2);
        // Releasing the first task's CPUs starts queued work (shapes are
        // served round-robin), never more than fits.
        let mut ran = started(s.release(&cpus(2.0)));
        assert_eq!(ran.len(), 1);
        let done = if ran == vec![3] { cpus(0.5) } else { cpus(2.0) };
        ran.extend(started(s.release(&done)));
        ran.sort();
        assert_eq!(ran, vec![2, 3]);
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn rejects_infeasible_requests() {
        let s = Scheduler::new(cpus(1.0));
        assert!(matches!(s.submit(W(cpus(1.5), 1)), Err(Rejected::Infeasible(_))));
    }
}
