//! A reader in another process maps the arena it inherited and reads a
//! sealed, pinned object at its offset — no bytes travel through a pipe or a
//! socket, only the descriptor and `(offset, len)`.

mod common;

use std::process::Command;

use common::{checksum, pattern, store};
use rustyray_shm::{inherit_arena, Arena, ShmError};

const ARENA_VAR: &str = "RUSTYRAY_SHM_TEST_ARENA";
const REGION_VAR: &str = "RUSTYRAY_SHM_TEST_REGION";

#[test]
fn a_child_process_reads_a_sealed_object_through_the_inherited_arena(
) -> Result<(), Box<dyn std::error::Error>> {
    let (_dir, store) = store(1 << 20);
    let id = 0x5eed;
    let bytes = pattern(id, 300_000);
    store.put(1, &pattern(1, 1000))?; // so the object does not sit at offset 0
    store.put(id, &bytes)?;
    let (offset, len) = store.pin(id)?;
    assert!(offset > 0);

    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "--exact",
        "child_prints_checksum_of_region",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd.env(REGION_VAR, format!("{offset}:{len}"));
    inherit_arena(&mut cmd, store.arena(), ARENA_VAR)?;
    let output = cmd.output()?;
    store.unpin(id)?;

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The test harness prints its own text around the child's line.
    let reported = stdout
        .split("checksum=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next());
    assert_eq!(
        reported,
        Some(format!("{:016x}", checksum(&bytes)).as_str()),
        "child said: {stdout}"
    );
    Ok(())
}

/// The child side, run by the test above in a fresh process; a no-op when
/// run by hand without the hand-off variables.
#[test]
#[ignore = "run as a child process by a_child_process_reads_a_sealed_object_through_the_inherited_arena"]
fn child_prints_checksum_of_region() -> Result<(), ShmError> {
    let Some(arena) = Arena::from_env(ARENA_VAR)? else {
        return Ok(());
    };
    let region = std::env::var(REGION_VAR).unwrap_or_default();
    let (offset, len) = region
        .split_once(':')
        .and_then(|(o, l)| Some((o.parse::<usize>().ok()?, l.parse::<usize>().ok()?)))
        .ok_or_else(|| ShmError::BadHandoff(format!("{REGION_VAR}={region:?}")))?;
    // SAFETY: the parent pinned this sealed object before starting this
    // process and unpins it only after the process exits, so nobody writes
    // the region while the slice lives.
    let bytes = unsafe { arena.region(offset, len)? };
    println!("checksum={:016x}", checksum(bytes));
    Ok(())
}
