//! Crash points: the steps after which a kill must leave nothing
//! half-done, numbered so that tests can kill vfiod after each in turn,
//! make each fail, or do something to the host between two of them.
//!
//! A step is every action of vfiod's that outlives the process: a sysfs
//! write, an ACL change on a device node, a registry commit reaching the
//! disk. Each is numbered when it begins ([`begin`]) and reported when it
//! is over, made or failed ([`Step::made`]). The crash-point tests run an
//! operation once with `VFIOD_STEP_TRACE=FILE` to learn its steps (one
//! line each: number, kind, what), then once per step with one of:
//!
//! * `VFIOD_CRASH_AFTER_STEP=N`: after its N-th step vfiod sends itself
//!   SIGKILL, exactly as a `kill -9` from outside at that instant would end
//!   it, and the test restarts it and checks what it recovers to.
//! * `VFIOD_FAULT_AT_STEP=N:ERRNO` (or `N:STAGE:ERRNO`): step N is not
//!   made; it fails with that errno (`EIO`, `ENODEV`, `EBUSY`, `ENOSPC`,
//!   ... or a number) as if the kernel or the disk had refused it. A
//!   registry commit has three stages that can fail, `write` (the
//!   default), `fsync` and `rename` of the state file; a sysfs write and an
//!   ACL change have one, `write`. Only that one step fails: what vfiod
//!   does next (a rollback, a retry) runs normally.
//! * `VFIOD_PAUSE_AFTER_STEP=N:PATH`: after step N vfiod creates PATH
//!   (holding N) and waits until PATH is removed (20 s at most), so that a
//!   test can change the host between two steps (pull the device, kill the
//!   VMM) at a known point. The step's thread waits, nothing else: a pause
//!   inside a sysfs write counts against that write's timeout.
//!
//! Deterministic, where a kill from outside is a race: the step a signal
//! lands after depends on scheduling, so sampling kill times finds a bad
//! crash point only by luck (3 kills in 24 found the grant that outlived
//! its attachment). Numbers are taken in the order steps begin; the steps
//! of one operation never overlap, so a traced run and an armed run of the
//! same operation on the same host number them alike.
//!
//! Every variable is ignored unless vfiod runs on a fake tree (`--sysfs`
//! other than `/sys`): a host in service never dies, fails or waits on
//! purpose, whatever its environment says.

use std::fmt::Display;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The environment variable naming the step to die after.
pub const CRASH_AFTER_STEP: &str = "VFIOD_CRASH_AFTER_STEP";
/// The environment variable naming the file that lists every step.
pub const STEP_TRACE: &str = "VFIOD_STEP_TRACE";
/// The environment variable naming the step to fail, and how.
pub const FAULT_AT_STEP: &str = "VFIOD_FAULT_AT_STEP";
/// The environment variable naming the step to pause after, and the file
/// whose removal ends the pause.
pub const PAUSE_AFTER_STEP: &str = "VFIOD_PAUSE_AFTER_STEP";

/// How long a pause waits for its file to go before vfiod goes on anyway.
const PAUSE_BOUND: Duration = Duration::from_secs(20);

/// What a step was, for the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A sysfs attribute write returned (successfully or not).
    SysfsWrite,
    /// An ACL entry on a device node was added or removed.
    Acl,
    /// A registry version reached the disk (or failed to).
    Commit,
}

impl StepKind {
    fn as_str(self) -> &'static str {
        match self {
            StepKind::SysfsWrite => "sysfs",
            StepKind::Acl => "acl",
            StepKind::Commit => "commit",
        }
    }
}

/// The part of a step a fault can hit. Sysfs writes and ACL changes have
/// only [`Stage::Write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The write itself (the temporary state file's bytes, for a commit).
    Write,
    /// The state file's fsync: the bytes may be in the cache, not on disk.
    Fsync,
    /// The rename over the old state file, which makes the commit visible.
    Rename,
}

impl Stage {
    fn parse(s: &str) -> Option<Stage> {
        match s {
            "write" => Some(Stage::Write),
            "fsync" => Some(Stage::Fsync),
            "rename" => Some(Stage::Rename),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fault {
    step: u64,
    stage: Stage,
    errno: i32,
}

/// The errno names a fault may use (or a plain number).
fn parse_errno(s: &str) -> Option<i32> {
    use nix::errno::Errno;
    let known = [
        ("EIO", Errno::EIO),
        ("ENODEV", Errno::ENODEV),
        ("EBUSY", Errno::EBUSY),
        ("ENOSPC", Errno::ENOSPC),
        ("EDQUOT", Errno::EDQUOT),
        ("EROFS", Errno::EROFS),
        ("EPERM", Errno::EPERM),
        ("EACCES", Errno::EACCES),
        ("EINVAL", Errno::EINVAL),
        ("ENOENT", Errno::ENOENT),
        ("EAGAIN", Errno::EAGAIN),
    ];
    known
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, e)| *e as i32)
        .or_else(|| s.parse().ok().filter(|n| *n > 0))
}

/// `N:ERRNO` or `N:STAGE:ERRNO`.
fn parse_fault(spec: &str) -> Option<Fault> {
    let parts: Vec<&str> = spec.trim().split(':').collect();
    let (step, stage, errno) = match parts.as_slice() {
        [n, errno] => (n, Stage::Write, errno),
        [n, stage, errno] => (n, Stage::parse(stage)?, errno),
        _ => return None,
    };
    Some(Fault {
        step: step.parse().ok()?,
        stage,
        errno: parse_errno(errno)?,
    })
}

/// `N:PATH`.
fn parse_pause(spec: &str) -> Option<(u64, PathBuf)> {
    let (n, path) = spec.split_once(':')?;
    Some((n.parse().ok()?, PathBuf::from(path)))
}

#[derive(Default)]
struct Armed {
    crash_after: Option<u64>,
    fault: Option<Fault>,
    pause_after: Option<(u64, PathBuf)>,
    trace: Option<Mutex<std::fs::File>>,
}

impl Armed {
    fn any(&self) -> bool {
        self.crash_after.is_some()
            || self.fault.is_some()
            || self.pause_after.is_some()
            || self.trace.is_some()
    }
}

static ARMED: OnceLock<Armed> = OnceLock::new();
static STEPS: AtomicU64 = AtomicU64::new(0);

/// Reads the variables, once, at startup; `fake_tree` is false on a real
/// `/sys`, which disarms everything. A variable that does not parse is
/// reported and ignored.
pub fn init(fake_tree: bool) {
    let armed = if fake_tree {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let parsed = |name: &'static str, ok: bool| {
            if !ok {
                tracing::error!(
                    variable = name,
                    "ignoring a test variable that does not parse"
                );
            }
        };
        let crash_after = var(CRASH_AFTER_STEP).and_then(|v| {
            let n = v.trim().parse().ok();
            parsed(CRASH_AFTER_STEP, n.is_some());
            n
        });
        let fault = var(FAULT_AT_STEP).and_then(|v| {
            let f = parse_fault(&v);
            parsed(FAULT_AT_STEP, f.is_some());
            f
        });
        let pause_after = var(PAUSE_AFTER_STEP).and_then(|v| {
            let p = parse_pause(&v);
            parsed(PAUSE_AFTER_STEP, p.is_some());
            p
        });
        let trace = std::env::var_os(STEP_TRACE).and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
                .map(Mutex::new)
        });
        Armed {
            crash_after,
            fault,
            pause_after,
            trace,
        }
    } else {
        Armed::default()
    };
    let _ = ARMED.set(armed);
}

fn armed() -> Option<&'static Armed> {
    ARMED.get().filter(|a| a.any())
}

/// One step under way: numbered when it began. Disarmed (a real host, or
/// no variable set), it is only a marker and costs nothing.
#[must_use = "a step is reported with `made` once it is over"]
pub struct Step {
    n: u64,
    kind: StepKind,
}

/// Begins a step of `kind`.
pub fn begin(kind: StepKind) -> Step {
    let n = match armed() {
        Some(_) => STEPS.fetch_add(1, Ordering::SeqCst) + 1,
        None => 0,
    };
    Step { n, kind }
}

impl Step {
    /// The error a test armed for `stage` of this step, if any: the caller
    /// then does not make that stage and fails with this error instead.
    pub fn injected(&self, stage: Stage) -> Option<std::io::Error> {
        let fault = armed()?.fault?;
        (self.n != 0 && fault.step == self.n && fault.stage == stage).then(|| {
            tracing::warn!(
                step = self.n,
                kind = self.kind.as_str(),
                errno = fault.errno,
                "fault injected: this step fails"
            );
            std::io::Error::from_raw_os_error(fault.errno)
        })
    }

    /// Runs `stage` of this step unless a fault is armed for it.
    pub fn run<T>(
        &self,
        stage: Stage,
        action: impl FnOnce() -> std::io::Result<T>,
    ) -> std::io::Result<T> {
        match self.injected(stage) {
            Some(e) => Err(e),
            None => action(),
        }
    }

    /// The step is over (made or failed): traced, then a pause or the
    /// crash if one is armed for it.
    pub fn made(self, what: impl Display) {
        let Some(armed) = armed() else {
            return;
        };
        let n = self.n;
        if let Some(trace) = &armed.trace {
            let mut file = trace.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(file, "{n} {} {what}", self.kind.as_str());
        }
        if let Some((_, path)) = armed.pause_after.as_ref().filter(|(p, _)| *p == n) {
            pause(n, self.kind, path);
        }
        if armed.crash_after == Some(n) {
            tracing::warn!(
                step = n,
                kind = self.kind.as_str(),
                "crash point reached: vfiod kills itself"
            );
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn pause(n: u64, kind: StepKind, path: &std::path::Path) {
    tracing::warn!(step = n, kind = kind.as_str(), path = %path.display(), "pause point reached: waiting for the file to go");
    if let Err(e) = std::fs::write(path, n.to_string()) {
        tracing::error!(path = %path.display(), error = %e, "cannot create the pause file; not pausing");
        return;
    }
    let deadline = Instant::now() + PAUSE_BOUND;
    while path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse_with_and_without_a_stage() {
        assert_eq!(
            parse_fault("7:EIO"),
            Some(Fault {
                step: 7,
                stage: Stage::Write,
                errno: nix::errno::Errno::EIO as i32
            })
        );
        assert_eq!(
            parse_fault("12:rename:ENOSPC"),
            Some(Fault {
                step: 12,
                stage: Stage::Rename,
                errno: nix::errno::Errno::ENOSPC as i32
            })
        );
        assert_eq!(parse_fault("3:16").map(|f| f.errno), Some(16));
        assert_eq!(parse_fault("3:close:EIO"), None);
        assert_eq!(parse_fault("x:EIO"), None);
        assert_eq!(parse_fault("3:ENOTANERRNO"), None);
        assert_eq!(parse_pause("4:/tmp/p"), Some((4, PathBuf::from("/tmp/p"))));
    }
}
