//! A seeded random soak (issue 18, item 3): random sequences of
//! operations, faults, kills, restarts and hotplug against a reference
//! model of what vfiod should report, checked against the model, the
//! simulated kernel and the invariants of `crashkit` after every step.
//!
//! CI runs a bounded budget (`VFIOD_SOAK_SECS`, 30 s by default) of seeds
//! from a fixed base (`VFIOD_SOAK_SEED`, or the seed each run prints), after
//! the seeds that once failed (`REGRESSION_SEEDS`). A failure prints its seed
//! and the shortest sequence found that still fails (the sequence shrunk
//! one step at a time), ready to paste into a regression test.
//!
//! The model holds what a user asked for and was told: which devices are
//! registered, bound by vfiod, attached, tagged, and which are on the bus.
//! An operation answered while no fault was due must do exactly what the
//! model predicts (success or refusal, and the state after). One hit by
//! an armed kill or fault (vfiod's step trace says whether it was) may end
//! in any state the operation may leave (all, nothing, or its documented
//! first half), and the model takes the one vfiod shows.

mod crashkit;

use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crashkit::{is_root, spec_of, trace_lines, Host, AUDIO, GPU, NIC, VFIO, VMM_UID};

/// Seeds that once failed, each replayed first in every run.
const REGRESSION_SEEDS: &[u64] = &[];
const OPS_PER_SEED: usize = 30;
const EDU: &str = "0000:00:03.0";

/// xorshift64*: small, seeded, the same everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dev {
    Nic,
    Gpu,
    Edu,
}

const DEVS: [Dev; 3] = [Dev::Nic, Dev::Gpu, Dev::Edu];

impl Dev {
    fn addr(self) -> &'static str {
        match self {
            Dev::Nic => NIC,
            Dev::Gpu => GPU,
            Dev::Edu => EDU,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dev::Nic => "nic",
            Dev::Gpu => "gpu",
            Dev::Edu => "edu",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn native(self) -> Option<String> {
        spec_of(self.addr()).driver
    }

    fn resettable(self) -> bool {
        spec_of(self.addr()).reset_methods.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Register(Dev),
    Delete(Dev),
    Bind(Dev, bool),
    Unbind(Dev),
    Attach(Dev),
    Detach(Dev, bool),
    Reset(Dev, &'static str),
    Tag(Dev, u8),
    VmmExit,
    Unplug(Dev),
    Replug(Dev, bool),
    Restart,
    /// Restart with a kill armed after step N (counted from the start).
    ArmKill(u8),
    /// Restart with a fault armed at step N.
    ArmFault(u8, &'static str),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

const FAULTS: &[&str] = &[
    "EIO",
    "ENODEV",
    "EBUSY",
    "write:ENOSPC",
    "fsync:EIO",
    "rename:EIO",
];

fn generate(seed: u64, len: usize) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    (0..len)
        .map(|_| {
            let d = rng.pick(&DEVS);
            match rng.below(100) {
                0..=11 => Op::Register(d),
                12..=17 => Op::Delete(d),
                18..=31 => Op::Bind(d, rng.below(3) != 0),
                32..=41 => Op::Unbind(d),
                42..=53 => Op::Attach(d),
                54..=62 => Op::Detach(d, rng.below(2) == 0),
                63..=67 => Op::Reset(d, rng.pick(&["auto", "flr", "pm"])),
                68..=70 => Op::Tag(d, rng.below(3) as u8),
                71..=74 => Op::VmmExit,
                75..=80 => Op::Unplug(d),
                81..=86 => Op::Replug(d, rng.below(2) == 0),
                87..=89 => Op::Restart,
                90..=94 => Op::ArmKill(1 + rng.below(14) as u8),
                _ => Op::ArmFault(1 + rng.below(14) as u8, rng.pick(FAULTS)),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct DevState {
    registered: bool,
    bound: bool,
    attached: bool,
    tag: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Model {
    devs: [DevState; 3],
    present: [bool; 3],
    /// The GPU's audio companion was given back while the GPU itself,
    /// off the bus, stayed recorded as vfiod's (a delete cut short).
    companion_back: bool,
}

impl Model {
    fn new() -> Model {
        Model {
            devs: [DevState::default(); 3],
            present: [true; 3],
            companion_back: false,
        }
    }

    fn dev(&self, d: Dev) -> DevState {
        self.devs[d.index()]
    }

    fn with(&self, d: Dev, f: impl FnOnce(&mut DevState)) -> Model {
        let mut m = self.clone();
        f(&mut m.devs[d.index()]);
        if d == Dev::Gpu && !m.devs[d.index()].bound {
            m.companion_back = false;
        }
        m
    }

    /// The audio function moves only with the GPU, as its companion.
    fn audio_on_vfio(&self) -> bool {
        self.dev(Dev::Gpu).bound && !self.companion_back
    }
}

/// What an operation should do with no fault due: succeed into a model,
/// or be refused (4xx) leaving the model.
enum Expect {
    Ok(Model),
    Refused,
}

/// The prediction, and the other states an interrupted run may leave.
fn predict(m: &Model, op: Op) -> (Expect, Vec<Model>) {
    use Expect::*;
    let none = Vec::new;
    match op {
        Op::Register(d) => {
            if m.dev(d).registered || !m.present[d.index()] {
                (Refused, none())
            } else {
                (
                    Ok(m.with(d, |s| {
                        *s = DevState {
                            registered: true,
                            ..DevState::default()
                        }
                    })),
                    none(),
                )
            }
        }
        Op::Delete(d) => {
            let s = m.dev(d);
            if !s.registered || s.attached {
                (Refused, none())
            } else {
                let gone = m.with(d, |s| *s = DevState::default());
                let given_back = m.with(d, |s| s.bound = false);
                let first_half = if s.bound && m.present[d.index()] {
                    vec![given_back]
                } else if s.bound && d == Dev::Gpu {
                    // Off the bus: its companion given back, not the GPU.
                    let mut back = m.clone();
                    back.companion_back = true;
                    vec![back]
                } else {
                    vec![]
                };
                (Ok(gone), first_half)
            }
        }
        Op::Bind(d, with_group) => {
            let s = m.dev(d);
            if !s.registered || !m.present[d.index()] {
                return (Refused, none());
            }
            if d == Dev::Gpu && !with_group && !m.audio_on_vfio() {
                return (Refused, none());
            }
            let mut bound = m.with(d, |s| s.bound = true);
            if d == Dev::Gpu {
                bound.companion_back = false;
            }
            (Ok(bound), none())
        }
        Op::Unbind(d) => {
            let s = m.dev(d);
            if !s.registered || s.attached || (s.bound && !m.present[d.index()]) {
                return (Refused, none());
            }
            (Ok(m.with(d, |s| s.bound = false)), none())
        }
        Op::Attach(d) => {
            let s = m.dev(d);
            if !s.registered || !m.present[d.index()] {
                return (Refused, none());
            }
            if s.attached {
                return (Ok(m.clone()), none());
            }
            if d == Dev::Gpu && !s.bound && !m.audio_on_vfio() {
                return (Refused, none());
            }
            let bound_only = m.with(d, |s| s.bound = true);
            (
                Ok(m.with(d, |s| {
                    s.bound = true;
                    s.attached = true
                })),
                vec![bound_only],
            )
        }
        Op::Detach(d, keep) => {
            let s = m.dev(d);
            if !s.registered {
                return (Refused, none());
            }
            let give_back = !keep && s.bound && m.present[d.index()];
            let detached = m.with(d, |s| s.attached = false);
            let done = m.with(d, |s| {
                s.attached = false;
                if give_back {
                    s.bound = false;
                }
            });
            (Ok(done), vec![detached])
        }
        Op::Reset(d, _) => {
            let s = m.dev(d);
            if !s.registered || !m.present[d.index()] || s.attached || !d.resettable() {
                return (Refused, none());
            }
            (Ok(m.clone()), none())
        }
        Op::Tag(d, v) => {
            if !m.dev(d).registered {
                return (Refused, none());
            }
            (Ok(m.with(d, |s| s.tag = Some(v))), none())
        }
        Op::VmmExit => {
            let mut after = m.clone();
            for s in after.devs.iter_mut() {
                s.attached = false;
            }
            (Ok(after), none())
        }
        Op::Unplug(d) => {
            let mut after = m.clone();
            after.present[d.index()] = false;
            (Ok(after), none())
        }
        Op::Replug(d, _) => {
            let mut after = m.clone();
            after.present[d.index()] = true;
            (Ok(after), none())
        }
        Op::Restart | Op::ArmKill(_) | Op::ArmFault(..) => (Ok(m.clone()), none()),
    }
}

/// How vfiod and the kernel differ from `m`, if they do.
fn compare(h: &Host, m: &Model) -> Result<(), String> {
    let devices = h.devices()?;
    for d in DEVS {
        let s = m.dev(d);
        let rec = devices.iter().find(|r| r["pci_address"] == d.addr());
        let present = m.present[d.index()];
        if h.fs.device_dir(d.addr()).is_some() != present {
            return Err(format!("{}: on the bus is not {present}", d.name()));
        }
        match (s.registered, rec) {
            (false, None) => {}
            (false, Some(r)) => return Err(format!("{} is registered: {r}", d.name())),
            (true, None) => return Err(format!("{} is not registered", d.name())),
            (true, Some(r)) => {
                if r["name"] != d.name() {
                    return Err(format!("{}: name {}", d.name(), r["name"]));
                }
                if r["bound_by_vfiod"] != s.bound {
                    return Err(format!(
                        "{}: bound_by_vfiod is not {}: {r}",
                        d.name(),
                        s.bound
                    ));
                }
                if r["attached_to"].is_null() == s.attached {
                    return Err(format!("{}: attached is not {}: {r}", d.name(), s.attached));
                }
                let tag = r["tags"]["k"].as_str().map(str::to_owned);
                if tag != s.tag.map(|t| t.to_string()) {
                    return Err(format!("{}: tag {tag:?}, expected {:?}", d.name(), s.tag));
                }
            }
        }
        if present {
            let want = if s.bound || s.attached {
                Some(VFIO.to_owned())
            } else {
                d.native()
            };
            let found = h.fs.driver_of(d.addr());
            if found != want {
                return Err(format!(
                    "{}: kernel driver {found:?}, expected {want:?}",
                    d.name()
                ));
            }
        }
    }
    let want = if m.audio_on_vfio() {
        Some(VFIO.to_owned())
    } else {
        spec_of(AUDIO).driver
    };
    let found = h.fs.driver_of(AUDIO);
    if found != want {
        return Err(format!("audio: kernel driver {found:?}, expected {want:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Running a sequence
// ---------------------------------------------------------------------------

struct Run {
    h: Host,
    model: Model,
    trace: PathBuf,
    /// The step number an armed kill or fault is at, while not yet hit.
    armed: Option<u64>,
    /// Soak steps done (operations and checks).
    steps: usize,
}

impl Run {
    fn start() -> Run {
        let mut h = Host::new(&[]);
        let trace = h.scratch.path().join("steps");
        let mut run = Run {
            model: Model::new(),
            trace,
            armed: None,
            steps: 0,
            h: {
                h.d.kill9();
                h
            },
        };
        run.spawn(&[]).expect("vfiod starts");
        run
    }

    /// (Re)starts vfiod traced with `env`; `Err` if it died on the way
    /// up (a kill armed inside startup).
    fn spawn(&mut self, env: &[(&str, String)]) -> Result<(), String> {
        self.h.d.kill9();
        let _ = std::fs::remove_file(&self.trace);
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        env.push(("VFIOD_STEP_TRACE".into(), self.trace.display().to_string()));
        self.h.d.env = env;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.h.d.log)
            .unwrap();
        let mut cmd = self.h.d.command();
        cmd.stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().map_err(|e| format!("spawn vfiod: {e}"))?;
        self.h.d.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.h.d.socket).is_ok() && self.h.alive() {
                return Ok(());
            }
            if let Some(status) = self.h.d.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("vfiod exited on the way up: {status}"));
            }
            if Instant::now() >= deadline {
                return Err("vfiod did not come up".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the armed kill or fault has been hit (it is then disarmed).
    fn hit(&mut self) -> bool {
        let Some(n) = self.armed else {
            return false;
        };
        let hit = trace_lines(&self.trace)
            .iter()
            .any(|l| l.split_whitespace().next() == Some(n.to_string().as_str()));
        if hit {
            self.armed = None;
        }
        hit
    }

    /// Brings vfiod back if it is gone (killed at its crash point).
    fn revive(&mut self) -> Result<(), String> {
        let dead = self
            .h
            .d
            .child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some());
        if dead || !self.h.alive() {
            for _ in 0..3 {
                self.armed = None;
                if self.spawn(&[]).is_ok() {
                    return Ok(());
                }
            }
            return Err("vfiod does not come back up".into());
        }
        Ok(())
    }

    fn request(&self, method: &str, path: &str, body: &str) -> Option<u16> {
        self.h.status_of(method, path, body)
    }

    /// Does `op`; the answer (None: none, or not a request).
    fn act(&mut self, op: Op) -> Result<Option<u16>, String> {
        let h = &self.h;
        let path = |d: Dev, what: &str| format!("/devices/{}{what}", d.name());
        Ok(match op {
            Op::Register(d) => self.request(
                "POST",
                "/devices",
                &format!(r#"{{"pci_address":"{}","name":"{}"}}"#, d.addr(), d.name()),
            ),
            Op::Delete(d) => self.request("DELETE", &path(d, ""), ""),
            Op::Bind(d, g) => self.request(
                "POST",
                &path(d, "/bind"),
                &format!(r#"{{"with_group":{g}}}"#),
            ),
            Op::Unbind(d) => self.request("POST", &path(d, "/unbind"), ""),
            Op::Attach(d) => self.request(
                "POST",
                &path(d, "/attach"),
                &format!(
                    r#"{{"instance_id":"vm-1","uid":{VMM_UID},"pid":{}}}"#,
                    h.vmm_pid()
                ),
            ),
            Op::Detach(d, keep) => self.request(
                "POST",
                &path(d, "/detach"),
                &format!(r#"{{"keep_bound":{keep}}}"#),
            ),
            Op::Reset(d, m) => self.request(
                "POST",
                &path(d, "/reset"),
                &format!(r#"{{"method":"{m}"}}"#),
            ),
            Op::Tag(d, v) => self.request(
                "PATCH",
                &path(d, ""),
                &format!(r#"{{"tags":{{"k":"{v}"}}}}"#),
            ),
            Op::VmmExit => {
                h.kill_vmm();
                h.new_vmm();
                None
            }
            Op::Unplug(d) => {
                if h.fs.device_dir(d.addr()).is_some() {
                    h.unplug(d.addr());
                }
                None
            }
            Op::Replug(d, racing) => {
                if h.fs.device_dir(d.addr()).is_none() {
                    if racing {
                        h.replug_racing(d.addr());
                    } else {
                        h.replug(d.addr());
                    }
                }
                None
            }
            Op::Restart => {
                self.armed = None;
                self.spawn(&[])?;
                None
            }
            Op::ArmKill(n) => {
                self.armed = Some(n as u64);
                let _ = self.spawn(&[("VFIOD_CRASH_AFTER_STEP", n.to_string())]);
                None
            }
            Op::ArmFault(n, spec) => {
                self.armed = Some(n as u64);
                let _ = self.spawn(&[("VFIOD_FAULT_AT_STEP", format!("{n}:{spec}"))]);
                None
            }
        })
    }

    /// Does `op` and checks the outcome against the model.
    fn step(&mut self, op: Op) -> Result<(), String> {
        self.revive()?;
        let (expect, halves) = predict(&self.model, op);
        let answered = self.act(op)?;
        let hit = self.hit() || (self.armed.is_some() && !self.h.alive());
        self.revive()?;
        self.steps += 1;
        let candidates: Vec<Model> = match (&expect, answered, hit) {
            (_, _, true) => {
                // Interrupted: all, nothing or a documented half.
                let mut c = vec![self.model.clone()];
                if let Expect::Ok(m) = &expect {
                    c.push(m.clone());
                }
                c.extend(halves);
                c
            }
            (Expect::Ok(m), Some(s), false) if s < 300 => vec![m.clone()],
            (Expect::Ok(_), Some(s), false) => {
                return Err(format!("{op}: expected success, answered {s}"));
            }
            (Expect::Refused, Some(s), false) if (400..500).contains(&s) => {
                vec![self.model.clone()]
            }
            (Expect::Refused, Some(s), false) => {
                return Err(format!("{op}: expected a refusal, answered {s}"));
            }
            (Expect::Ok(m), None, false) => vec![m.clone()],
            (Expect::Refused, None, false) => vec![self.model.clone()],
        };
        self.model = self.settle(op, &candidates)?;
        Ok(())
    }

    /// Waits (bounded) until the invariants hold and the host matches one
    /// of `candidates`; returns it.
    fn settle(&self, op: Op, candidates: &[Model]) -> Result<Model, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let allowed: Vec<Vec<&str>> = candidates
            .iter()
            .map(|m| {
                DEVS.iter()
                    .filter(|d| m.dev(**d).registered)
                    .map(|d| d.name())
                    .collect()
            })
            .collect();
        let allowed: Vec<&[&str]> = allowed.iter().map(Vec::as_slice).collect();
        loop {
            let outcome = self.h.settled(&allowed).and_then(|()| {
                let mut why = Vec::new();
                for m in candidates {
                    match compare(&self.h, m) {
                        Ok(()) => return Ok(m.clone()),
                        Err(e) => why.push(e),
                    }
                }
                Err(format!("the model: {}", why.join(" / ")))
            });
            match outcome {
                Ok(m) => return Ok(m),
                Err(e) if Instant::now() >= deadline => return Err(format!("after {op}: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Runs `ops` on a fresh host; the index of the failing step and why.
fn replay(ops: &[Op]) -> (usize, Result<(), (usize, String)>) {
    let mut run = Run::start();
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = run.step(*op) {
            return (
                run.steps,
                Err((i, format!("{e}\nlog tail:\n{}", run.h.log_tail(30)))),
            );
        }
    }
    (run.steps, Ok(()))
}

/// The shortest prefix that fails, then single steps left out while it
/// still fails; bounded by `budget`.
fn shrink(ops: &[Op], failed_at: usize, budget: Duration) -> Vec<Op> {
    let started = Instant::now();
    let mut best: Vec<Op> = ops[..=failed_at].to_vec();
    let mut i = 0;
    while i < best.len() && started.elapsed() < budget {
        let mut candidate = best.clone();
        candidate.remove(i);
        match replay(&candidate).1 {
            Err((at, _)) => best = candidate[..=at].to_vec(),
            Ok(()) => i += 1,
        }
    }
    best
}

fn soak_secs() -> u64 {
    std::env::var("VFIOD_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

fn base_seed() -> u64 {
    std::env::var("VFIOD_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_0018)
}

fn fail(seed: u64, ops: &[Op], at: usize, why: &str) -> ! {
    eprintln!("soak: seed {seed} failed at step {at} ({}): {why}", ops[at]);
    eprintln!("soak: shrinking (at most 4 minutes)...");
    let short = shrink(ops, at, Duration::from_secs(240));
    let listed: Vec<String> = short.iter().map(|o| format!("Op::{o:?}")).collect();
    panic!(
        "soak: seed {seed} fails; shortest sequence found ({} of {} steps):\n    [{}]\nreplay it with `replay(&[...])` in a regression test; first failure: {why}",
        short.len(),
        at + 1,
        listed.join(", ")
    );
}

fn replay_must_pass(ops: &[Op]) {
    if !is_root() {
        eprintln!("skipped: attachments to other uids need root");
        return;
    }
    if let (_, Err((at, why))) = replay(ops) {
        panic!("fails at step {at} ({}): {why}", ops[at]);
    }
}

/// Seed 1592590363 (shrunk): a GPU bound with its audio function, pulled
/// from the bus, then deleted. vfiod forgot the audio function it had
/// moved with it, which stayed on vfio-pci with vfiod's override.
#[test]
fn soak_regression_deleting_a_pulled_gpu_gives_its_companion_back() {
    replay_must_pass(&[
        Op::Register(Dev::Gpu),
        Op::Bind(Dev::Gpu, true),
        Op::Unplug(Dev::Gpu),
        Op::Delete(Dev::Gpu),
    ]);
}

#[test]
fn a_seeded_random_soak_keeps_every_invariant() {
    if !is_root() {
        eprintln!("skipped: attachments to other uids need root");
        return;
    }
    let budget = Duration::from_secs(soak_secs());
    let started = Instant::now();
    let mut seeds = 0;
    let mut steps = 0;
    let base = base_seed();
    let regression = REGRESSION_SEEDS.iter().copied();
    let fresh = (0..).map(|i| base.wrapping_add(i));
    for (n, seed) in regression.chain(fresh).enumerate() {
        if n >= REGRESSION_SEEDS.len() && started.elapsed() >= budget {
            break;
        }
        let ops = generate(seed, OPS_PER_SEED);
        let (done, result) = replay(&ops);
        steps += done;
        seeds += 1;
        if let Err((at, why)) = result {
            fail(seed, &ops, at, &why);
        }
    }
    eprintln!(
        "soak: {seeds} seeds from {base}, {steps} steps checked against the model in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}
