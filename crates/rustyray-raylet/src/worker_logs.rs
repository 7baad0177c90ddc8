//! Worker output, handled as Ray handles it.
//!
//! A worker process's stdout and stderr are pipes to the node. Every line
//! written to them goes to the worker's log file (`worker-<pid>.out` and
//! `worker-<pid>.err` in the node's log directory, made when the first line
//! arrives) and, unless [`crate::Config::log_to_driver`] turned it off, to
//! the driver's own stdout or stderr, prefixed with where it came from:
//! `(pid=4242)` for a task's worker, `(Counter pid=4242)` for the process of
//! an actor of class `Counter`. The files stay after shutdown, for a look at
//! what a crashed worker said last (Ray keeps its session logs too).
//!
//! A worker that starts hosting an actor says so in its own output, one
//! marker line per stream (`rustyray_proto::announce_actor`), as Ray's workers print
//! their actor's name into their logs: the label then changes exactly at
//! that point of each stream, so lines a task wrote earlier in a reused
//! process keep the plain prefix. Marker lines are neither echoed nor kept.
//!
//! One thread per stream copies the lines; it ends when the stream ends,
//! which is when the worker process is gone. A line longer than
//! [`MAX_LINE`] is passed on in pieces of that size, so a worker writing
//! without newlines cannot grow the node's memory.

use parking_lot::{Condvar, Mutex};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest piece of output passed on as one line.
pub(crate) const MAX_LINE: u64 = 64 * 1024;

/// How a worker's marker line starts.
const MARKER: &[u8] = rustyray_proto::ACTOR_LOG_MARKER;

/// The prefix of a line from process `pid`, hosting an actor of `class`
/// if any (its registry name; the label is the name's last segment, as Ray
/// prints the class name).
fn prefix(pid: u32, class: Option<&str>) -> String {
    match class.and_then(|c| c.rsplit("::").next()) {
        Some(class) => format!("({class} pid={pid}) "),
        None => format!("(pid={pid}) "),
    }
}

/// One of a worker's two output streams.
#[derive(Clone, Copy)]
enum Stream {
    Out,
    Err,
}

/// Where a node's worker output goes.
pub(crate) struct WorkerLogs {
    dir: PathBuf,
    to_driver: bool,
    /// How many streams are still being copied, and a wake-up for when
    /// that changes.
    active: Arc<(Mutex<usize>, Condvar)>,
}

impl WorkerLogs {
    /// Output of the node's workers goes to files in `dir` and, with
    /// `to_driver`, to this process's stdout and stderr.
    pub(crate) fn new(dir: PathBuf, to_driver: bool) -> Self {
        WorkerLogs {
            dir,
            to_driver,
            active: Arc::new((Mutex::new(0), Condvar::new())),
        }
    }

    /// Starts copying the output of worker process `pid` (spawned with
    /// piped stdout and stderr). An error when no thread could be started:
    /// the worker must not run then, as its first line would fail on a
    /// pipe nobody reads (and Rust's `println!` panics on that).
    pub(crate) fn follow(&self, pid: u32, child: &mut std::process::Child) -> std::io::Result<()> {
        if let Some(out) = child.stdout.take() {
            self.pump(pid, Stream::Out, out)?;
        }
        if let Some(err) = child.stderr.take() {
            self.pump(pid, Stream::Err, err)?;
        }
        Ok(())
    }

    fn pump(&self, pid: u32, stream: Stream, from: impl Read + Send + 'static) -> std::io::Result<()> {
        let file = self.dir.join(match stream {
            Stream::Out => format!("worker-{pid}.out"),
            Stream::Err => format!("worker-{pid}.err"),
        });
        let (to_driver, active) = (self.to_driver, self.active.clone());
        *active.0.lock() += 1;
        let started = std::thread::Builder::new()
            .name(format!("rustyray-log-{pid}"))
            .spawn(move || {
                copy_lines(from, &file, stream, to_driver.then_some(pid));
                let (count, changed) = &*active;
                *count.lock() -= 1;
                changed.notify_all();
            });
        if started.is_err() {
            *self.active.0.lock() -= 1;
        }
        started.map(drop)
    }

    /// Waits until every stream followed so far has ended (its process is
    /// gone and its last lines are copied), at most `limit`: a process the
    /// worker started may still hold its stream open.
    pub(crate) fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let (count, changed) = &*self.active;
        let mut n = count.lock();
        while *n > 0 {
            if changed.wait_until(&mut n, deadline).timed_out() {
                tracing::debug!(streams = *n, "worker output still open at shutdown");
                return;
            }
        }
    }
}

/// Copies `from` line by line into `file` (created at the first line) and,
/// with `driver` (the worker's pid), to this process's matching stream with
/// the line's prefix, until `from` ends.
fn copy_lines(from: impl Read, file: &Path, stream: Stream, driver: Option<u32>) {
    let mut from = BufReader::new(from);
    let mut line = Vec::with_capacity(256);
    let mut log = LogFile::Unopened;
    let mut class: Option<String> = None;
    // The end of a piece cut at `MAX_LINE` that is, or may begin, a marker:
    // read again in front of the next piece, so a marker is never split.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        line.clear();
        line.append(&mut carry);
        let carried = line.len();
        let read = match from.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(file = %file.display(), error = %e, "cannot read a worker's output");
                0
            }
        };
        if read == 0 && carried == 0 {
            return;
        }
        // A marker ends its line; it may follow a partial line.
        let mut marker = line.windows(MARKER.len()).position(|w| w == MARKER);
        if read != 0 && !line.ends_with(b"\n") {
            // Cut at `MAX_LINE`: hold back a marker whose class is still
            // arriving (at most one more piece), or a tail that may be the
            // start of one.
            let keep = match marker {
                Some(at) if line.len() - at < MAX_LINE as usize => line.len() - at,
                Some(_) => 0,
                None => (1..MARKER.len())
                    .rev()
                    .find(|&k| line.ends_with(&MARKER[..k]))
                    .unwrap_or(0),
            };
            if keep > 0 {
                carry = line.split_off(line.len() - keep);
                marker = line.windows(MARKER.len()).position(|w| w == MARKER);
            }
        }
        let text = &line[..marker.unwrap_or(line.len())];
        if !text.is_empty() {
            log.write(file, text);
            if let Some(pid) = driver {
                echo(stream, &prefix(pid, class.as_deref()), text);
            }
        }
        if let Some(at) = marker {
            let name = &line[at + MARKER.len()..];
            class = Some(String::from_utf8_lossy(name).trim_end().to_owned());
        }
        if read == 0 {
            return;
        }
    }
}

/// A log file, opened when the first line arrives.
enum LogFile {
    Unopened,
    Open(std::fs::File),
    /// It could not be made or written: said once, then skipped.
    Failed,
}

impl LogFile {
    fn write(&mut self, path: &Path, line: &[u8]) {
        if let LogFile::Unopened = self {
            let opened = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(path));
            *self = match opened {
                Ok(f) => LogFile::Open(f),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot make a worker log file");
                    LogFile::Failed
                }
            };
        }
        if let LogFile::Open(f) = self {
            if let Err(e) = f.write_all(line) {
                tracing::warn!(file = %path.display(), error = %e, "cannot write a worker log file");
                *self = LogFile::Failed;
            }
        }
    }
}

/// Writes one prefixed line to this process's stdout or stderr, whole (the
/// stream's lock keeps lines of different workers apart).
fn echo(stream: Stream, prefix: &str, line: &[u8]) {
    let mut out = Vec::with_capacity(prefix.len() + line.len() + 1);
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(line);
    if !line.ends_with(b"\n") {
        out.push(b'\n');
    }
    // A driver whose own output is closed loses the echo, not the file.
    let _ = match stream {
        Stream::Out => std::io::stdout().lock().write_all(&out),
        Stream::Err => std::io::stderr().lock().write_all(&out),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `copy_lines` keeps of `input` in a fresh log file (`None` when
    /// it makes no file); the directory goes afterwards.
    fn logged(test: &str, input: &[u8]) -> Option<Vec<u8>> {
        let dir = std::env::temp_dir().join(format!("rr-logs-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("nested").join("worker-1.out");
        copy_lines(input, &file, Stream::Out, None);
        let written = std::fs::read(&file).ok();
        let _ = std::fs::remove_dir_all(&dir);
        written
    }

    #[test]
    fn lines_go_to_the_file_whole_and_long_ones_in_pieces() {
        let mut input = b"first\nsecond\n".to_vec();
        input.extend_from_slice(&vec![b'x'; MAX_LINE as usize + 10]);
        input.extend_from_slice(b"\nno newline at the end");
        assert_eq!(logged("unit", &input).as_deref(), Some(&input[..]));
    }

    #[test]
    fn nothing_written_makes_no_file() {
        assert_eq!(logged("empty", b""), None);
    }

    #[test]
    fn prefixes_name_the_pid_and_an_actors_class() {
        assert_eq!(prefix(7, None), "(pid=7) ");
        assert_eq!(prefix(7, Some("my_app::actors::Counter")), "(Counter pid=7) ");
    }

    #[test]
    fn marker_lines_are_neither_kept_nor_echoed() {
        let input = [
            &b"before\n"[..],
            MARKER,
            b"app::Counter\nafter\npartial ",
            MARKER,
            b"app::Other\nend\n",
        ]
        .concat();
        assert_eq!(
            logged("marker", &input).as_deref(),
            Some(&b"before\nafter\npartial end\n"[..])
        );
    }

    /// A marker that straddles a `MAX_LINE` piece boundary (after a long
    /// partial line, e.g. a progress bar printed with `print!`) is still a
    /// marker, and so is one whose class is cut by the boundary.
    #[test]
    fn a_marker_split_across_a_piece_boundary_is_still_a_marker() {
        let dots = vec![b'.'; MAX_LINE as usize - 3];
        let commas = vec![b','; MAX_LINE as usize - MARKER.len() - 4];
        let input = [
            &dots[..],
            MARKER,
            b"app::Counter\nafter\n",
            &commas,
            MARKER,
            b"app::Other\nend\n",
        ]
        .concat();
        let expected = [&dots[..], b"after\n", &commas, b"end\n"].concat();
        let written = logged("split", &input).expect("the log file");
        assert!(
            written == expected,
            "marker bytes leaked into the log: {:?}",
            written
                .windows(8)
                .position(|w| w == b"rustyray")
                .map(|at| String::from_utf8_lossy(
                    &written[at.saturating_sub(4)..(at + 30).min(written.len())]
                ))
        );
    }
}
