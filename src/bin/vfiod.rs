//! The vfiod daemon: wires configuration, the core, the hotplug watcher,
//! the API server and systemd together, in the order that makes a restart
//! safe: lock the state, subscribe to uevents, scan and reconcile, serve,
//! then tell systemd it is ready.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vfiod::api::{self, AccessPolicy, Api};
use vfiod::config::{Config, ConfigError};
use vfiod::core::{Core, CoreOptions};
use vfiod::engine::Engine;
use vfiod::pci::{PciIds, Sysfs};
use vfiod::registry::store::Store;
use vfiod::{hotplug, systemd};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let is_root = nix::unistd::geteuid().is_root() || runs_as_the_system_agent();
    let mut config = match Config::from_args(&args, is_root) {
        Ok(c) => c,
        Err(ConfigError::Cli(e)) => {
            // --help and --version land here too, on stdout with exit 0.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
        Err(e) => {
            eprintln!("vfiod: {e}");
            return ExitCode::from(2);
        }
    };
    systemd::init_logging(&config.log_level);
    config.limits = api::limits::fit_to_descriptors(config.limits);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(vfiod::RUNTIME_WORKER_THREADS)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            systemd::log_fatal(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, is_root)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            systemd::log_fatal(&failure.message);
            systemd::notify_status(&format!("failed: {}", failure.message));
            ExitCode::from(failure.exit_code)
        }
    }
}

/// The packaged service runs as its own user with exactly the capabilities
/// its unit grants (CAP_DAC_OVERRIDE to write sysfs); it is then the host's
/// agent as root would be: system paths, driver moves.
fn runs_as_the_system_agent() -> bool {
    const CAP_DAC_OVERRIDE: u32 = 1;
    vfiod::proc::own_effective_capabilities()
        .is_some_and(|caps| caps & (1 << CAP_DAC_OVERRIDE) != 0)
}

/// Why startup failed, and the exit status that tells systemd whether a
/// restart could help (the unit does not restart on 2, as for a bad config).
struct StartupFailure {
    message: String,
    exit_code: u8,
}

impl From<String> for StartupFailure {
    fn from(message: String) -> Self {
        StartupFailure {
            message,
            exit_code: 1,
        }
    }
}

async fn run(config: Config, is_root: bool) -> Result<(), StartupFailure> {
    let started = Instant::now();
    // Installed before anything can connect: a SIGTERM that arrives as soon
    // as the socket exists is then a graceful stop, not death by the
    // signal's default action.
    let stop_signals = StopSignals::install()
        .map_err(|e| format!("cannot install the SIGTERM/SIGINT handlers: {e}"))?;
    let sysfs = Sysfs::new(&config.sysfs, &config.devfs);
    let real_sysfs = sysfs.is_real();
    vfiod::crashpoint::init(!real_sysfs);
    let privileged = is_root || !real_sysfs;
    let ids = tokio::task::spawn_blocking(PciIds::load_default);
    let store = Store::open(&config.state_dir).map_err(|e| e.to_string())?;
    let engine = Engine::new(sysfs.clone(), config.op_timeout);
    let ids = ids.await.map_err(|e| e.to_string())?;
    let loaded_ms = started.elapsed().as_millis() as u64;
    let vfio_aliases = vfiod::pci::VfioAliases::load(&config.modules_dir);
    let options = CoreOptions {
        vfio_aliases,
        load_modules: config.load_modules,
        reclaim: config.reclaim,
        reset_on_release: config.reset_on_release,
        quarantine_after: config.quarantine_after,
        proc_root: config.proc.clone(),
        unbind_on_vmm_exit: config.unbind_on_vmm_exit,
        privileged,
        // A rule written from a fake tree would describe devices this host
        // does not have: only an explicitly chosen directory is used then.
        udev_rules_dir: config.udev_rules_dir.clone().filter(|dir| {
            privileged
                && (real_sysfs
                    || dir.as_path() != std::path::Path::new(vfiod::config::DEFAULT_UDEV_RULES_DIR))
        }),
    };
    let core = Core::new(engine, store, ids, options).map_err(|e| {
        use vfiod::registry::store::StoreError;
        // A broken state file needs a person, not a restart.
        let needs_operator = matches!(
            e,
            StoreError::Corrupt { .. } | StoreError::UnknownVersion { .. }
        );
        StartupFailure {
            message: e.to_string(),
            exit_code: if needs_operator { 2 } else { 1 },
        }
    })?;

    // Subscribe before scanning, so nothing that happens between the scan
    // and the first event is lost.
    let (hotplug_tx, mut hotplug_rx) = mpsc::channel(1024);
    let source = hotplug::start(real_sysfs, config.uevent_fifo.as_deref(), hotplug_tx)
        .map_err(|e| format!("starting the hotplug watcher: {e}"))?;
    if source == hotplug::Source::Kernel {
        tracing::warn!("no udevd is running (/run/udev/control missing): following the kernel's uevents directly");
    }
    core.set_hotplug_source(&source.to_string());
    core.reconcile()
        .await
        .map_err(|e| format!("reconciling with the bus: {e}"))?;
    let reconciled_ms = started.elapsed().as_millis() as u64;

    let gid = nix::unistd::Group::from_name(&config.group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw());
    if gid.is_none() {
        tracing::warn!(group = %config.group, "access group does not exist: only root and the daemon's own user may change things");
    }
    let (listener, socket_guard) =
        systemd::listen(&config.socket, gid).map_err(|e| e.to_string())?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            format!("metrics listener on {addr}: {e} (under systemd, RestrictAddressFamilies= and IPAddressDeny= must allow it: see vfiod(8))")
        })?),
        None => None,
    };
    let shutdown = CancellationToken::new();
    let policy = AccessPolicy {
        group_gid: gid,
        owner_uid: nix::unistd::geteuid().as_raw(),
    };
    let api = Api::new(core.clone(), policy, shutdown.clone())
        .with_limits(config.limits, config.header_timeout);

    let hotplug_core = core.clone();
    tokio::spawn(async move {
        while let Some(event) = hotplug_rx.recv().await {
            hotplug_core.handle_hotplug(event).await;
        }
    });
    if let Some(interval) = systemd::watchdog_interval() {
        tokio::spawn(watchdog(core.clone(), interval));
    }

    let status = format!(
        "serving {} devices on {}; hotplug: {source}",
        core.snapshot().len(),
        if socket_guard.activated {
            "the systemd socket".to_owned()
        } else {
            config.socket.display().to_string()
        }
    );
    tracing::info!(
        socket = %config.socket.display(),
        activated = socket_guard.activated,
        state_dir = %config.state_dir.display(),
        sysfs = %config.sysfs.display(),
        privileged,
        loaded_ms,
        reconciled_ms,
        metrics_listen = ?config.metrics_listen,
        startup_ms = started.elapsed().as_millis() as u64,
        connections_per_uid = config.limits.connections_per_uid,
        event_streams_per_uid = config.limits.event_streams_per_uid,
        unprivileged_connections = config.limits.unprivileged_connections,
        "ready: {status}"
    );
    systemd::notify_ready(&status);

    let grace = Duration::from_secs(10);
    let metrics_server = metrics_listener
        .map(|listener| tokio::spawn(api::serve_metrics(listener, api.clone(), grace)));
    let server = tokio::spawn(api::serve(listener, api, grace));
    stop_signals.wait().await;
    tracing::info!("shutting down: no new connections, finishing requests and moves in flight");
    systemd::notify_stopping();
    shutdown.cancel();
    let _ = server.await;
    if let Some(metrics_server) = metrics_server {
        let _ = metrics_server.await;
    }
    // A move is never cut off half-way: each write in it is bounded by the
    // op timeout, and a write the kernel keeps is left recorded as stuck
    // for the next start to settle.
    let bound = config.op_timeout * 3 + Duration::from_secs(1);
    if !core.finish_operations(bound).await {
        tracing::warn!("operations still in flight after {bound:?}; their devices are recorded as pending and are settled at the next start");
    }
    drop(socket_guard);
    tracing::info!("stopped");
    Ok(())
}

/// Pings systemd only while the core answers: a wedged registry lock
/// stops the pings and systemd restarts us.
async fn watchdog(core: Arc<Core>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let _ = core.snapshot();
        systemd::notify_watchdog();
    }
}

/// SIGTERM and SIGINT, caught from the moment they are installed (a
/// signal that arrives before [`StopSignals::wait`] is kept for it).
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
