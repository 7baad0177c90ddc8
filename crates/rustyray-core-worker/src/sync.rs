//! The synchronization primitives the object store is built on, behind one
//! name so that the store can be model-checked.
//!
//! Without the `shuttle` feature these are plain re-exports — parking_lot's
//! [`Mutex`] and [`Condvar`] and std's atomics — so the shim costs nothing.
//! With it they are thin wrappers over `shuttle::sync`, which lets
//! `shuttle` control every lock, wait, notification and atomic access and
//! explore their interleavings (see the store's `model_tests`).
//!
//! The wrappers keep parking_lot's API: `lock()` returns the guard directly
//! (a poisoned shuttle mutex is entered anyway, as parking_lot has no
//! poisoning), and the condition variable waits through `&mut guard`.
//!
//! Timed waits under `shuttle`: shuttle's `Condvar::wait_timeout` never
//! times out, so the model of [`Condvar::wait_until`] is: a deadline that
//! has already passed times out at once, without waiting; otherwise the
//! wait lasts until a notification, after which it reports a time-out iff
//! the deadline has passed by then. A wait that is never notified does not
//! time out: it blocks forever and shuttle reports a deadlock. That is an
//! under-approximation (schedules in which a timer fires first are not
//! explored) chosen on purpose: a lost wake-up shows up as a deadlock
//! instead of being hidden by a time-out.
//!
//! Shuttle treats every atomic access as `SeqCst`, so it cannot find bugs
//! that need weaker orderings; the orderings used with these atomics must
//! be argued for separately.
//!
//! Only the store uses this module: the rest of the crate keeps using
//! parking_lot and std directly, which is why the `shuttle` feature is for
//! the store's model tests only (shuttle primitives may only be used inside
//! a shuttle execution).

pub(crate) use std::sync::atomic::Ordering;

#[cfg(not(feature = "shuttle"))]
pub(crate) use parking_lot::{Condvar, Mutex};
#[cfg(not(feature = "shuttle"))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

#[cfg(feature = "shuttle")]
pub(crate) use model::{Condvar, Mutex};
#[cfg(feature = "shuttle")]
pub(crate) use shuttle::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

#[cfg(feature = "shuttle")]
mod model {
    use std::fmt;
    use std::ops::{Deref, DerefMut};
    use std::sync::PoisonError;
    use std::time::{Duration, Instant};

    /// A mutex with parking_lot's API over `shuttle::sync::Mutex`.
    pub(crate) struct Mutex<T: ?Sized>(shuttle::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) const fn new(value: T) -> Self {
            Self(shuttle::sync::Mutex::new(value))
        }
    }

    impl<T: ?Sized> Mutex<T> {
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard(Some(self.0.lock().unwrap_or_else(PoisonError::into_inner)))
        }
    }

    impl<T: ?Sized> fmt::Debug for Mutex<T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Mutex { .. }")
        }
    }

    /// The guard of a locked [`Mutex`]. The option is empty only while its
    /// thread waits on a [`Condvar`] (and after a wait unwound).
    pub(crate) struct MutexGuard<'a, T: ?Sized>(Option<shuttle::sync::MutexGuard<'a, T>>);

    impl<T: ?Sized> Deref for MutexGuard<'_, T> {
        type Target = T;

        fn deref(&self) -> &T {
            self.0.as_deref().expect("mutex guard used during a condvar wait")
        }
    }

    impl<T: ?Sized> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.0
                .as_deref_mut()
                .expect("mutex guard used during a condvar wait")
        }
    }

    /// Whether a timed wait returned because its deadline passed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct WaitTimeoutResult(bool);

    impl WaitTimeoutResult {
        pub(crate) fn timed_out(self) -> bool {
            self.0
        }
    }

    /// A condition variable with parking_lot's API over
    /// `shuttle::sync::Condvar`; see the module doc for timed waits.
    pub(crate) struct Condvar(shuttle::sync::Condvar);

    impl Condvar {
        pub(crate) const fn new() -> Self {
            Self(shuttle::sync::Condvar::new())
        }

        /// Waits for a notification, releasing the lock meanwhile.
        pub(crate) fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
            let inner = guard.0.take().expect("mutex guard used during a condvar wait");
            guard.0 = Some(self.0.wait(inner).unwrap_or_else(PoisonError::into_inner));
        }

        /// Waits for a notification or until `deadline`.
        pub(crate) fn wait_until<T>(
            &self,
            guard: &mut MutexGuard<'_, T>,
            deadline: Instant,
        ) -> WaitTimeoutResult {
            if Instant::now() >= deadline {
                return WaitTimeoutResult(true);
            }
            self.wait(guard);
            WaitTimeoutResult(Instant::now() >= deadline)
        }

        /// Waits for a notification or for `timeout`.
        #[allow(dead_code, reason = "part of the parking_lot API the shim mirrors")]
        pub(crate) fn wait_for<T>(
            &self,
            guard: &mut MutexGuard<'_, T>,
            timeout: Duration,
        ) -> WaitTimeoutResult {
            match Instant::now().checked_add(timeout) {
                Some(deadline) => self.wait_until(guard, deadline),
                None => {
                    self.wait(guard);
                    WaitTimeoutResult(false)
                }
            }
        }

        /// Wakes one waiting thread. (parking_lot's returns whether one was
        /// woken; shuttle's does not say.)
        #[allow(dead_code, reason = "part of the parking_lot API the shim mirrors")]
        pub(crate) fn notify_one(&self) {
            self.0.notify_one();
        }

        /// Wakes every waiting thread. (parking_lot's returns how many were
        /// woken; shuttle's does not say.)
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    impl fmt::Debug for Condvar {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Condvar { .. }")
        }
    }
}

#[cfg(all(test, feature = "shuttle"))]
mod model_tests {
    use super::{Condvar, Mutex};
    use shuttle::thread;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// The wrappers hand the guard to shuttle's condvar and back: a waiter
    /// woken by `notify_one` sees the flag set under the lock, and a timed
    /// wait past its deadline returns at once, timed out, still locked.
    #[test]
    fn model_shim_condvar_handoff() {
        shuttle::check_random(
            || {
                let pair = Arc::new((Mutex::new(false), Condvar::new()));
                let notifier = {
                    let pair = Arc::clone(&pair);
                    thread::spawn(move || {
                        *pair.0.lock() = true;
                        pair.1.notify_one();
                    })
                };
                let (lock, cv) = &*pair;
                let mut ready = lock.lock();
                assert!(cv.wait_until(&mut ready, Instant::now()).timed_out());
                while !*ready {
                    assert!(!cv.wait_for(&mut ready, Duration::from_secs(3600)).timed_out());
                }
                drop(ready);
                notifier.join().unwrap();
            },
            1_000,
        );
    }
}
