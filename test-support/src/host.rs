//! Where most end-to-end tests start: a fake tree, its simulated kernel and
//! a real `vfiod` on it ([`Host`]), built by [`HostBuilder`]; and, for tests
//! of what vfiod answers where no driver ever moves, vfiod alone on the
//! standard host ([`standard_daemon`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::fakeproc::FakeProc;
use crate::fakesys::FakeSys;
use crate::simkernel::SimKernel;
use crate::Daemon;

/// vfiod on the standard host ([`crate::standard`]) with no simulated
/// kernel: a driver write would go nowhere. The tree lives as long as the
/// returned [`FakeSys`].
pub fn standard_daemon() -> (FakeSys, Daemon) {
    let fs = FakeSys::standard_host();
    let d = Daemon::start(&fs, &[]);
    (fs, d)
}

/// A fake tree, the simulated kernel reacting to writes into it, and vfiod
/// serving it. Fields drop in this order: vfiod first, so that it never
/// writes to a kernel that is gone, then the kernel, then the trees.
pub struct Host {
    pub d: Daemon,
    pub sim: SimKernel,
    pub fs: FakeSys,
    proc: Option<FakeProc>,
    uevent_fifo: Option<PathBuf>,
}

/// How to build a [`Host`]: which tree, which extra `vfiod` arguments, and
/// whether vfiod reads uevents from a FIFO of the test's or scans a fake
/// `/proc` for holders.
pub struct HostBuilder {
    fs: Option<FakeSys>,
    args: Vec<String>,
    uevent_fifo: bool,
    fake_proc: bool,
}

impl Host {
    /// The standard host, its kernel, and vfiod started with `args`.
    pub fn standard(args: &[&str]) -> Host {
        Host::builder().args(args).start()
    }

    /// A builder starting from the standard host and no extra arguments.
    pub fn builder() -> HostBuilder {
        HostBuilder {
            fs: None,
            args: Vec::new(),
            uevent_fifo: false,
            fake_proc: false,
        }
    }

    /// The fake `/proc` vfiod scans (`--proc`).
    #[track_caller]
    pub fn proc(&self) -> &FakeProc {
        self.proc
            .as_ref()
            .expect("a host built without HostBuilder::fake_proc has no fake /proc")
    }

    /// The FIFO vfiod reads uevents from (`--uevent-fifo`).
    #[track_caller]
    pub fn uevent_fifo(&self) -> &Path {
        self.uevent_fifo
            .as_deref()
            .expect("a host built without HostBuilder::uevent_fifo has no uevent FIFO")
    }

    /// Injects one uevent line (`add ADDR`, `remove ADDR`, `bind ADDR
    /// DRIVER`, `unbind ADDR`), as the udev watcher would pass it on.
    #[track_caller]
    pub fn uevent(&self, line: &str) {
        let fifo = self.uevent_fifo();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(fifo)
            .unwrap_or_else(|e| panic!("open {}: {e}", fifo.display()));
        writeln!(f, "{line}").unwrap_or_else(|e| panic!("write {}: {e}", fifo.display()));
    }

    /// `GET /devices/{name}`, as JSON.
    pub fn device(&self, name: &str) -> Value {
        self.d.get(&format!("/devices/{name}")).json()
    }
}

impl HostBuilder {
    /// Serves `fs` instead of the standard host.
    pub fn on(mut self, fs: FakeSys) -> Self {
        self.fs = Some(fs);
        self
    }

    /// Extra `vfiod` arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// vfiod reads uevents from a FIFO the test writes ([`Host::uevent`]).
    pub fn uevent_fifo(mut self) -> Self {
        self.uevent_fifo = true;
        self
    }

    /// vfiod scans a fake `/proc` ([`Host::proc`]) for holders.
    pub fn fake_proc(mut self) -> Self {
        self.fake_proc = true;
        self
    }

    /// Starts the simulated kernel, then vfiod, and waits until it answers.
    pub fn start(self) -> Host {
        let fs = self.fs.unwrap_or_else(FakeSys::standard_host);
        let proc = self.fake_proc.then(FakeProc::new);
        let sim = SimKernel::start(&fs);
        let uevent_fifo = self.uevent_fifo.then(|| fs.tmp_root().join("uevents"));
        let mut args = Vec::new();
        if let Some(fifo) = &uevent_fifo {
            args.push("--uevent-fifo".to_owned());
            args.push(fifo.display().to_string());
        }
        if let Some(proc) = &proc {
            args.push("--proc".to_owned());
            args.push(proc.root.display().to_string());
        }
        args.extend(self.args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let d = Daemon::start(&fs, &args);
        Host {
            d,
            sim,
            fs,
            proc,
            uevent_fifo,
        }
    }
}
