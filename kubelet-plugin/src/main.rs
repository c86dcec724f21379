//! vfiod-kubelet-plugin: the kubelet device plugin in front of vfiod.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use vfiod_kubelet_plugin::follow::Follower;
use vfiod_kubelet_plugin::inventory::Inventory;
use vfiod_kubelet_plugin::plugin::{AttachmentLock, Manager, Settings};
use vfiod_kubelet_plugin::release::Releaser;
use vfiod_kubelet_plugin::vfiod::VfiodClient;

/// Kubelet device plugin for vfiod: advertises the PCI devices registered
/// with vfiod under the extended resource named by their resource tag
/// (e.g. `vfioctl register 0000:a2:00.0 --name l4-0 --tag resource=nvidia.com/L4`),
/// one plugin endpoint per resource, with each device's health and NUMA
/// node. When kubelet allocates devices to a pod, it moves them to vfio
/// through vfiod, attaches them to an instance id naming the allocation
/// ("kubelet:RESOURCE:MS:IDS"), and gives the container /dev/vfio/vfio,
/// /dev/vfio/N (and /dev/iommu, /dev/vfio/devices/vfioX where present) and
/// PCI_RESOURCE_<RESOURCE>=the PCI addresses, as KubeVirt expects.
///
/// A device is Healthy when it is present, no driver move of it is stuck,
/// its health is not quarantined or needs_host_reboot, and it is not
/// attached to an instance outside kubelet. The plugin needs root or the
/// vfiod group to move devices.
#[derive(Parser, Debug)]
#[command(name = "vfiod-kubelet-plugin", version, about, long_about)]
struct Cli {
    /// vfiod's API socket.
    #[arg(long, env = "VFIOD_SOCKET", default_value = "/run/vfiod/vfiod.sock")]
    vfiod_socket: PathBuf,
    /// Kubelet's device-plugins directory; the endpoints' sockets go here.
    #[arg(long, default_value = "/var/lib/kubelet/device-plugins")]
    plugin_dir: PathBuf,
    /// Kubelet's registration socket [default: PLUGIN_DIR/kubelet.sock].
    #[arg(long)]
    kubelet_socket: Option<PathBuf>,
    /// The device tag whose value is the extended resource name.
    #[arg(long, default_value = "resource")]
    tag_key: String,
    /// Move the other functions of a device's IOMMU group with it (a GPU's
    /// audio function, for instance).
    #[arg(long)]
    with_group: bool,
    /// Root of sysfs, read for numa_node and vfio-dev (tests use a fake tree).
    #[arg(long, default_value = "/sys")]
    sysfs: PathBuf,
    /// Root of the device nodes named in Allocate's DeviceSpecs.
    #[arg(long, default_value = "/dev")]
    devfs: PathBuf,
    /// Kubelet's PodResources socket, asked which devices the pods it runs
    /// still hold.
    #[arg(long, default_value = "/var/lib/kubelet/pod-resources/kubelet.sock")]
    pod_resources_socket: PathBuf,
    /// How often to release (detach, so that vfiod resets them) the devices
    /// of allocations no pod holds any more, in milliseconds; 0: never.
    #[arg(long, default_value_t = 10_000)]
    release_interval_ms: u64,
    /// An allocation younger than this is never released (kubelet lists a
    /// container's devices only once their Allocate has returned), in
    /// milliseconds.
    #[arg(long, default_value_t = 60_000)]
    release_grace_ms: u64,
    /// Log filter (tracing's env-filter syntax), e.g. info or debug.
    #[arg(long, env = "VFIOD_PLUGIN_LOG", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("vfiod-kubelet-plugin: --log-level {:?}: {e}", cli.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vfiod-kubelet-plugin: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    if !cli.plugin_dir.is_dir() {
        return Err(format!(
            "the device-plugins directory {} does not exist (is kubelet installed? --plugin-dir names another)",
            cli.plugin_dir.display()
        ));
    }
    let kubelet_socket = cli
        .kubelet_socket
        .clone()
        .unwrap_or_else(|| cli.plugin_dir.join("kubelet.sock"));
    tracing::info!(
        vfiod = %cli.vfiod_socket.display(),
        plugin_dir = %cli.plugin_dir.display(),
        kubelet = %kubelet_socket.display(),
        tag_key = %cli.tag_key,
        with_group = cli.with_group,
        "vfiod-kubelet-plugin {} starting",
        env!("CARGO_PKG_VERSION")
    );
    let vfiod = VfiodClient::new(&cli.vfiod_socket);
    let (inventory_tx, inventory_rx) = watch::channel(Arc::new(Inventory::default()));
    let (reconnects_tx, reconnects_rx) = watch::channel(0u64);
    let cancel = CancellationToken::new();

    let follower = Follower {
        vfiod: vfiod.clone(),
        tag_key: cli.tag_key.clone(),
        sysfs: cli.sysfs.clone(),
        inventory: inventory_tx,
        reconnects: reconnects_tx,
    };
    let attachments = AttachmentLock::default();
    let manager = Manager {
        settings: Arc::new(Settings {
            plugin_dir: cli.plugin_dir.clone(),
            kubelet_socket,
            sysfs: cli.sysfs.clone(),
            devfs: cli.devfs.clone(),
            with_group: cli.with_group,
        }),
        vfiod,
        inventory: inventory_rx,
        reconnects: reconnects_rx,
        attachments: attachments.clone(),
    };
    let releaser = (cli.release_interval_ms > 0).then(|| Releaser {
        vfiod: manager.vfiod.clone(),
        pod_resources: cli.pod_resources_socket.clone(),
        tag_key: cli.tag_key.clone(),
        interval: Duration::from_millis(cli.release_interval_ms),
        grace: Duration::from_millis(cli.release_grace_ms),
        attachments,
    });
    let follow_task = tokio::spawn(follower.run(cancel.clone()));
    let manager_task = tokio::spawn(manager.run(cancel.clone()));
    let release_task = releaser.map(|r| tokio::spawn(r.run(cancel.clone())));

    wait_for_signal().await?;
    tracing::info!("stopping: removing the endpoint sockets");
    cancel.cancel();
    let _ = follow_task.await;
    let _ = manager_task.await;
    if let Some(task) = release_task {
        let _ = task.await;
    }
    Ok(())
}

async fn wait_for_signal() -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
