//! Dependencies: tasks wait for their reference arguments, failures
//! propagate with their cause, random DAGs match a sequential oracle, and
//! nested tasks that block in `get` do not deadlock.

mod common;
use common::both_modes;
use proptest::prelude::*;
use rustyray::prelude::*;
use rustyray::TaskFailure;

#[rustyray::remote]
fn add(a: i64, b: i64) -> i64 {
    a.wrapping_add(b)
}

#[rustyray::remote]
fn mul(a: i64, b: i64) -> i64 {
    a.wrapping_mul(b)
}

#[rustyray::remote(max_retries = 0)]
fn fail_with(msg: String) -> Result<i64, String> {
    Err(msg)
}

#[rustyray::remote(num_cpus = 1.0)]
fn fib(n: u32) -> u64 {
    if n < 2 {
        return u64::from(n);
    }
    let ray = rustyray::current().expect("inside a task");
    let a = fib::remote(&ray, n - 1).expect("submit");
    let b = fib::remote(&ray, n - 2).expect("submit");
    ray.get(&a).expect("fib a") + ray.get(&b).expect("fib b")
}

#[rustyray::remote(num_cpus = 1.0)]
async fn fib_async(n: u32) -> u64 {
    if n < 2 {
        return u64::from(n);
    }
    let ray = rustyray::current().expect("inside a task");
    let a = fib_async::remote(&ray, n - 1).expect("submit");
    let b = fib_async::remote(&ray, n - 2).expect("submit");
    a.await.expect("fib a") + b.await.expect("fib b")
}

#[rustyray::remote]
fn wait_then_sum(refs: Vec<ObjectRef<i64>>) -> i64 {
    let ray = rustyray::current().expect("inside a task");
    let (ready, _) = ray.wait(&refs, refs.len(), None).expect("wait");
    ray.get_many(&ready).expect("get").iter().sum()
}

both_modes! {
    fn failure_propagates_with_its_cause(ray) {
        let bad = fail_with::remote(ray, "root cause".to_string())?;
        let dependent = add::remote(ray, &bad, 1)?;
        let grandchild = mul::remote(ray, 2, &dependent)?;
        let err = ray.get(&grandchild).expect_err("must fail");
        match &err {
            Error::Task { function, failure: TaskFailure::DependencyFailed, .. } => {
                assert!(function.ends_with("mul"), "{function}");
            }
            other => panic!("expected a dependency failure, got {other:?}"),
        }
        // Walk the chain down to the original error.
        let mut chain = Vec::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&err);
        while let Some(e) = cur {
            chain.push(e.to_string());
            cur = e.source();
        }
        assert_eq!(chain.len(), 3, "{chain:#?}");
        assert!(chain[2].contains("root cause"), "{chain:#?}");
        Ok(())
    }
}

#[test]
fn nested_fib_completes_with_two_cpus() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    let r = fib::remote(&ray, 20)?;
    assert_eq!(ray.get(&r)?, 6765);
    Ok(())
}

#[test]
fn nested_fib_completes_through_bytes() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, true);
    assert_eq!(ray.get(&fib::remote(&ray, 15)?)?, 610);
    Ok(())
}

#[test]
fn nested_async_fib_completes_with_two_cpus() -> rustyray::Result<()> {
    let ray = common::runtime(2.0, false);
    assert_eq!(ray.get(&fib_async::remote(&ray, 18)?)?, 2584);
    Ok(())
}

#[test]
fn a_task_blocked_in_wait_releases_its_cpu() -> rustyray::Result<()> {
    let ray = common::runtime(1.0, false);
    // One CPU: the waiting task must lend it to the tasks it waits for.
    let refs: Vec<ObjectRef<i64>> = (0..4)
        .map(|i| add::remote(&ray, i, 0))
        .collect::<Result<_, _>>()?;
    let outer = wait_then_sum::remote(&ray, refs)?;
    assert_eq!(ray.get(&outer)?, 6);
    Ok(())
}

#[derive(Debug, Clone)]
enum Operand {
    Lit(i64),
    Node(usize),
}

#[derive(Debug, Clone)]
struct NodeSpec {
    mul: bool,
    a: Operand,
    b: Operand,
}

fn dag() -> impl Strategy<Value = Vec<NodeSpec>> {
    prop::collection::vec(
        (
            any::<bool>(),
            any::<(bool, i64, prop::sample::Index)>(),
            any::<(bool, i64, prop::sample::Index)>(),
        ),
        1..40,
    )
    .prop_map(|raw| {
        raw.into_iter()
            .enumerate()
            .map(|(i, (mul, a, b))| {
                let operand = |(is_ref, lit, idx): (bool, i64, prop::sample::Index)| {
                    if is_ref && i > 0 {
                        Operand::Node(idx.index(i))
                    } else {
                        Operand::Lit(lit % 1000)
                    }
                };
                NodeSpec {
                    mul,
                    a: operand(a),
                    b: operand(b),
                }
            })
            .collect()
    })
}

fn run_dag(ray: &Ray, nodes: &[NodeSpec]) -> rustyray::Result<Vec<i64>> {
    let mut refs: Vec<ObjectRef<i64>> = Vec::new();
    for n in nodes {
        let r = match (&n.a, &n.b) {
            (Operand::Lit(a), Operand::Lit(b)) => {
                if n.mul {
                    mul::remote(ray, *a, *b)
                } else {
                    add::remote(ray, *a, *b)
                }
            }
            (Operand::Lit(a), Operand::Node(j)) => {
                if n.mul {
                    mul::remote(ray, *a, &refs[*j])
                } else {
                    add::remote(ray, *a, &refs[*j])
                }
            }
            (Operand::Node(i), Operand::Lit(b)) => {
                if n.mul {
                    mul::remote(ray, &refs[*i], *b)
                } else {
                    add::remote(ray, refs[*i].clone(), *b)
                }
            }
            (Operand::Node(i), Operand::Node(j)) => {
                if n.mul {
                    mul::remote(ray, &refs[*i], &refs[*j])
                } else {
                    add::remote(ray, &refs[*i], &refs[*j])
                }
            }
        }?;
        refs.push(r);
    }
    ray.get_many(&refs)
}

fn oracle(nodes: &[NodeSpec]) -> Vec<i64> {
    let mut out: Vec<i64> = Vec::new();
    for n in nodes {
        let v = |o: &Operand| match o {
            Operand::Lit(x) => *x,
            Operand::Node(j) => out[*j],
        };
        let (a, b) = (v(&n.a), v(&n.b));
        out.push(if n.mul {
            a.wrapping_mul(b)
        } else {
            a.wrapping_add(b)
        });
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn random_dags_match_a_sequential_oracle(nodes in dag(), bytes in any::<bool>()) {
        let ray = common::runtime(2.0, bytes);
        let got = run_dag(&ray, &nodes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got, oracle(&nodes));
        let s = ray.store_stats();
        prop_assert!(s.num_objects <= nodes.len() as u64);
    }
}

#[test]
fn a_deep_tree_of_nested_tasks_needs_threads_by_its_depth_not_its_size() -> rustyray::Result<()> {
    // fib(25) is 242,785 tasks, each blocking on its two children. A task
    // blocked on a child that is still queued runs it on its own thread, so
    // the tree needs threads in proportion to its depth (once made a thread
    // for each blocked task: fib(22) took ~16k threads and aborted).
    let ray = common::runtime(2.0, false);
    assert_eq!(ray.get_timeout(&fib::remote(&ray, 25)?, common::LONG)?, 75_025);
    // Idle pool threads stay 30 s, so those alive now are all it started.
    let threads = ray.pool_threads();
    assert!(threads <= 300, "fib(25) used {threads} pool threads");
    Ok(())
}

/// Blocks on `gate`; says how that ended.
#[rustyray::remote(num_cpus = 1.0)]
fn wait_for_gate(gate: ObjectRef<()>) -> Result<(), String> {
    let ray = rustyray::current().map_err(|e| e.to_string())?;
    ray.get(&gate).map_err(|e| e.to_string())
}

#[test]
fn at_the_thread_limit_a_task_fails_to_block_instead_of_hanging() -> rustyray::Result<()> {
    let ray = rustyray::init_with(Config::new().num_cpus(2.0).num_gpus(0.0).max_worker_threads(4))?;
    let (latch, gate) = common::latch(&ray);
    // Each task blocks on the gate, lending its CPU to the next: past four
    // threads, none is left to run the rest.
    let waits = (0..10)
        .map(|_| wait_for_gate::remote(&ray, gate.clone()))
        .collect::<rustyray::Result<Vec<_>>>()?;
    // The tasks that found no thread to block on fail; the others wait.
    let (refused, _) = ray.wait(&waits, 1, Some(common::LONG))?;
    let refused = ray.get(&refused[0]);
    match &refused {
        Err(Error::Task { message, .. }) => {
            assert!(message.contains("worker threads are in use"), "{message}")
        }
        other => panic!("expected a task that could not block, got {other:?}"),
    }
    ray.get(&latch.open()?)?;
    for w in &waits {
        match ray.get_timeout(w, common::LONG) {
            Ok(()) => {}
            Err(Error::Task { message, .. }) if message.contains("worker threads are in use") => {}
            other => panic!("expected the gate or the thread limit, got {other:?}"),
        }
    }
    // The runtime goes on.
    assert_eq!(ray.get_timeout(&fib::remote(&ray, 10)?, common::LONG)?, 55);
    Ok(())
}

/// Submits `wait_for_gate(gate)` and waits for it with a deadline; says
/// how that ended.
#[rustyray::remote(num_cpus = 1.0)]
fn wait_briefly_for_child(gate: ObjectRef<()>) -> Result<String, String> {
    let ray = rustyray::current().map_err(|e| e.to_string())?;
    let child = wait_for_gate::remote(&ray, gate).map_err(|e| e.to_string())?;
    match ray.get_timeout(&child, std::time::Duration::from_millis(100)) {
        Err(Error::GetTimeout { .. }) => Ok("timed out".to_owned()),
        other => Ok(format!("{other:?}")),
    }
}

#[test]
fn a_wait_with_a_deadline_does_not_run_a_queued_child_that_could_outlast_it() -> rustyray::Result<()> {
    // One CPU: the child stays queued while its parent runs. Run inline,
    // it would block on the gate and the parent's deadline would never
    // come.
    let ray = rustyray::init_with(Config::new().num_cpus(1.0).num_gpus(0.0))?;
    let (latch, gate) = common::latch(&ray);
    let said = ray.get_timeout(&wait_briefly_for_child::remote(&ray, gate)?, common::LONG)?;
    assert_eq!(said, "timed out");
    ray.get(&latch.open()?)?;
    Ok(())
}
