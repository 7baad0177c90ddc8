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

/// What a worker process's output is labelled with besides its pid: the
/// class of the actor it hosts, once it hosts one.
#[derive(Clone, Default)]
pub(crate) struct Label(Arc<Mutex<Option<&'static str>>>);

impl Label {
    /// Labels the process with its actor's class (its registry name; the
    /// label is the name's last segment, as Ray prints the class name).
    pub(crate) fn set(&self, class: &'static str) {
        *self.0.lock() = class.rsplit("::").next();
    }

    /// The prefix of a line from process `pid`.
    fn prefix(&self, pid: u32) -> String {
        match *self.0.lock() {
            Some(class) => format!("({class} pid={pid}) "),
            None => format!("(pid={pid}) "),
        }
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

    /// The directory of the log files.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts copying the output of worker process `pid` (spawned with
    /// piped stdout and stderr); `label` names what it hosts.
    pub(crate) fn follow(&self, pid: u32, child: &mut std::process::Child, label: &Label) {
        if let Some(out) = child.stdout.take() {
            self.pump(pid, Stream::Out, out, label);
        }
        if let Some(err) = child.stderr.take() {
            self.pump(pid, Stream::Err, err, label);
        }
    }

    fn pump(&self, pid: u32, stream: Stream, from: impl Read + Send + 'static, label: &Label) {
        let file = self.dir.join(match stream {
            Stream::Out => format!("worker-{pid}.out"),
            Stream::Err => format!("worker-{pid}.err"),
        });
        let (to_driver, label, active) = (self.to_driver, label.clone(), self.active.clone());
        *active.0.lock() += 1;
        let started = std::thread::Builder::new()
            .name(format!("rustyray-log-{pid}"))
            .spawn(move || {
                copy_lines(from, &file, stream, to_driver.then_some((pid, label)));
                let (count, changed) = &*active;
                *count.lock() -= 1;
                changed.notify_all();
            });
        if let Err(e) = started {
            // The pipe closes with `from`: the worker's writes fail, which
            // does not stop it.
            *self.active.0.lock() -= 1;
            tracing::warn!(pid, error = %e, "cannot start a thread for a worker's output");
        }
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
/// with `driver`, to this process's matching stream with the line's
/// prefix, until `from` ends.
fn copy_lines(from: impl Read, file: &Path, stream: Stream, driver: Option<(u32, Label)>) {
    let mut from = BufReader::new(from);
    let mut line = Vec::with_capacity(256);
    let mut log = LogFile::Unopened;
    loop {
        line.clear();
        match from.by_ref().take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(file = %file.display(), error = %e, "cannot read a worker's output");
                return;
            }
        }
        log.write(file, &line);
        if let Some((pid, label)) = &driver {
            echo(stream, &label.prefix(*pid), &line);
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

    #[test]
    fn lines_go_to_the_file_whole_and_long_ones_in_pieces() {
        let dir = std::env::temp_dir().join(format!("rr-logs-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join("nested").join("worker-1.out");
        let long = vec![b'x'; MAX_LINE as usize + 10];
        let mut input = b"first\nsecond\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nno newline at the end");
        copy_lines(&input[..], &file, Stream::Out, None);
        let written = std::fs::read(&file).expect("the log file was made");
        assert_eq!(written, input);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn nothing_written_makes_no_file() {
        let dir = std::env::temp_dir().join(format!("rr-logs-empty-{}", std::process::id()));
        let file = dir.join("worker-2.err");
        copy_lines(&b""[..], &file, Stream::Err, None);
        assert!(!file.exists());
    }

    #[test]
    fn prefixes_name_the_pid_and_an_actors_class() {
        let label = Label::default();
        assert_eq!(label.prefix(7), "(pid=7) ");
        label.set("my_app::actors::Counter");
        assert_eq!(label.prefix(7), "(Counter pid=7) ");
    }
}
