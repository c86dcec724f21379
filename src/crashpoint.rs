//! Crash points: the steps after which a kill must leave nothing
//! half-done, numbered so that tests can kill vfiod after each in turn.
//!
//! A step is every action of vfiod's that outlives the process: a sysfs
//! write returning, an ACL change on a device node, a registry commit
//! reaching the disk. Each calls [`step`]. The crash-point tests run an
//! operation once with `VFIOD_STEP_TRACE=FILE` to learn its steps (one
//! line each: number, kind, what), then once per step with
//! `VFIOD_CRASH_AFTER_STEP=N`: after its N-th step vfiod sends itself
//! SIGKILL, exactly as a `kill -9` from outside at that instant would end
//! it, and the test restarts it and checks what it recovers to.
//!
//! Deterministic, where a kill from outside is a race: the step a signal
//! lands after depends on scheduling, so sampling kill times finds a bad
//! crash point only by luck (3 kills in 24 found the grant that outlived
//! its attachment). Both variables are ignored unless vfiod runs on a fake
//! tree (`--sysfs` other than `/sys`): a host in service never dies on
//! purpose, whatever its environment says.

use std::fmt::Display;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The environment variable naming the step to die after.
pub const CRASH_AFTER_STEP: &str = "VFIOD_CRASH_AFTER_STEP";
/// The environment variable naming the file that lists every step.
pub const STEP_TRACE: &str = "VFIOD_STEP_TRACE";

/// What a step was, for the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A sysfs attribute write returned (successfully or not).
    SysfsWrite,
    /// An ACL entry on a device node was added or removed.
    Acl,
    /// A registry version reached the disk.
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

struct Armed {
    crash_after: Option<u64>,
    trace: Option<Mutex<std::fs::File>>,
}

static ARMED: OnceLock<Armed> = OnceLock::new();
static STEPS: AtomicU64 = AtomicU64::new(0);

/// Reads the variables, once, at startup; `fake_tree` is false on a real
/// `/sys`, which disarms everything.
pub fn init(fake_tree: bool) {
    let armed = if fake_tree {
        let crash_after = std::env::var(CRASH_AFTER_STEP)
            .ok()
            .and_then(|v| v.parse().ok());
        let trace = std::env::var_os(STEP_TRACE).and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
                .map(Mutex::new)
        });
        Armed { crash_after, trace }
    } else {
        Armed {
            crash_after: None,
            trace: None,
        }
    };
    let _ = ARMED.set(armed);
}

/// Counts one step; dies after it if this is the step to crash after.
pub fn step(kind: StepKind, what: impl Display) {
    let Some(armed) = ARMED.get() else {
        return;
    };
    if armed.crash_after.is_none() && armed.trace.is_none() {
        return;
    }
    let n = STEPS.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(trace) = &armed.trace {
        let mut file = trace.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(file, "{n} {} {what}", kind.as_str());
    }
    if armed.crash_after == Some(n) {
        tracing::warn!(
            step = n,
            kind = kind.as_str(),
            "crash point reached: vfiod kills itself"
        );
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
