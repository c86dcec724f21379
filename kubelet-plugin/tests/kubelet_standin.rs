//! A kubelet stand-in drives the real `vfiod-kubelet-plugin` binary
//! against a real `vfiod` on the fake sysfs tree and simulated kernel of
//! the root crate's tests.
//!
//! The stand-in does kubelet's part of the Device Plugin protocol: it
//! clears the device-plugins directory and serves `Registration` on
//! `kubelet.sock`; for each registration it dials the named endpoint and
//! calls GetDevicePluginOptions and ListAndWatch, then, as a pod asks,
//! GetPreferredAllocation and Allocate. A new registration for a resource
//! replaces the old connection, as kubelet does.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fakesys::{FakeSys, TempDir};
use common::simkernel::SimKernel;
use common::standard::{AMD, GPU, GPU_AUDIO, NIC, T4};
use common::Daemon;
use nix::errno::Errno;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use vfiod_kubelet_plugin::api::device_plugin_client::DevicePluginClient;
use vfiod_kubelet_plugin::api::registration_server::{Registration, RegistrationServer};
use vfiod_kubelet_plugin::api::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, Device,
    DevicePluginOptions, Empty, PreferredAllocationRequest, RegisterRequest,
};
use vfiod_kubelet_plugin::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use vfiod_kubelet_plugin::podresources::{
    ContainerDevices, ContainerResources, ListPodResourcesRequest, ListPodResourcesResponse,
    PodResources,
};

const NIC_RES: &str = "intel.com/e1000e";
const GPU_RES: &str = "nvidia.com/gpu";
const WAIT: Duration = Duration::from_secs(10);
/// The issue's bound on how soon kubelet sees a health change.
const KUBELET_SEES_WITHIN: Duration = Duration::from_secs(1);

/// Blocking test helpers (std sockets) called from async tests.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---- kubelet's Registration service -------------------------------------

struct RegistrationService {
    dir: PathBuf,
    tx: mpsc::UnboundedSender<RegisterRequest>,
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(&self, r: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let r = r.into_inner();
        // What kubelet checks before accepting a plugin.
        if r.version != "v1beta1" {
            return Err(Status::invalid_argument(format!(
                "unsupported version {:?}",
                r.version
            )));
        }
        let endpoint = self.dir.join(&r.endpoint);
        let is_socket = std::fs::metadata(&endpoint)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false);
        if r.endpoint.contains('/') || !is_socket {
            return Err(Status::invalid_argument(format!(
                "endpoint {:?} is not a socket in {}",
                r.endpoint,
                self.dir.display()
            )));
        }
        let _ = self.tx.send(r);
        Ok(Response::new(Empty {}))
    }
}

struct Kubelet {
    dir: PathBuf,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    registrations: mpsc::UnboundedReceiver<RegisterRequest>,
}

impl Kubelet {
    fn socket(dir: &Path) -> PathBuf {
        dir.join("kubelet.sock")
    }

    /// Kubelet's device manager at start: every socket in the directory
    /// goes, then kubelet.sock is served anew.
    fn start(dir: &Path) -> Kubelet {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_socket() {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        let listener = UnixListener::bind(Self::socket(dir)).unwrap();
        let (tx, registrations) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let service = RegistrationService {
            dir: dir.to_owned(),
            tx,
        };
        let shutdown = stop.clone();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await
                .unwrap();
        });
        Kubelet {
            dir: dir.to_owned(),
            stop,
            task,
            registrations,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
        let _ = std::fs::remove_file(Self::socket(&self.dir));
    }

    async fn next_registration(&mut self) -> RegisterRequest {
        tokio::time::timeout(WAIT, self.registrations.recv())
            .await
            .expect("no registration within 10 s")
            .expect("registration channel open")
    }

    /// The next `n` registrations, by resource name.
    async fn registrations(&mut self, n: usize) -> BTreeMap<String, RegisterRequest> {
        let mut out = BTreeMap::new();
        while out.len() < n {
            let r = self.next_registration().await;
            out.insert(r.resource_name.clone(), r);
        }
        out
    }

    async fn no_registration_for(&mut self, d: Duration) {
        if let Ok(Some(r)) = tokio::time::timeout(d, self.registrations.recv()).await {
            panic!("unexpected registration {r:?}");
        }
    }

    /// Kubelet's side after a registration: dial the plugin's endpoint.
    async fn dial(&self, r: &RegisterRequest) -> DevicePluginClient<Channel> {
        let path = self.dir.join(&r.endpoint);
        let channel = vfiod_kubelet_plugin::plugin::dial(&path)
            .await
            .unwrap_or_else(|e| panic!("dialing {}: {e}", r.endpoint));
        DevicePluginClient::new(channel)
    }
}

// ---- ListAndWatch as kubelet reads it ------------------------------------

/// id -> "Healthy@0" (health, and the NUMA node when there is one).
type View = BTreeMap<String, String>;

fn view(devices: &[Device]) -> View {
    devices
        .iter()
        .map(|d| {
            let numa = d
                .topology
                .as_ref()
                .map(|t| {
                    let nodes: Vec<String> = t.nodes.iter().map(|n| n.id.to_string()).collect();
                    format!("@{}", nodes.join(","))
                })
                .unwrap_or_default();
            (d.id.clone(), format!("{}{numa}", d.health))
        })
        .collect()
}

fn expect_view(pairs: &[(&str, &str)]) -> View {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

enum Update {
    List(Instant, View),
    Ended,
}

struct Watch {
    rx: mpsc::UnboundedReceiver<Update>,
    last: Option<View>,
    updates: usize,
}

impl Watch {
    async fn open(client: &mut DevicePluginClient<Channel>) -> Watch {
        let mut stream = client
            .list_and_watch(Empty {})
            .await
            .expect("ListAndWatch")
            .into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        if tx
                            .send(Update::List(Instant::now(), view(&m.devices)))
                            .is_err()
                        {
                            return;
                        }
                    }
                    _ => {
                        let _ = tx.send(Update::Ended);
                        return;
                    }
                }
            }
        });
        Watch {
            rx,
            last: None,
            updates: 0,
        }
    }

    /// The next list sent; `None` when the stream ended.
    async fn next(&mut self) -> Option<(Instant, View)> {
        match tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("no ListAndWatch update within 10 s")
        {
            Some(Update::List(at, v)) => {
                self.updates += 1;
                self.last = Some(v.clone());
                Some((at, v))
            }
            Some(Update::Ended) | None => None,
        }
    }

    async fn until(&mut self, what: &str, pred: impl Fn(&View) -> bool) -> (Instant, View) {
        loop {
            match self.next().await {
                Some((at, v)) if pred(&v) => return (at, v),
                Some(_) => {}
                None => panic!(
                    "ListAndWatch ended waiting for {what} (last {:?})",
                    self.last
                ),
            }
        }
    }

    /// Asserts nothing arrives for `d`.
    async fn quiet_for(&mut self, d: Duration) {
        if let Ok(Some(Update::List(_, v))) = tokio::time::timeout(d, self.rx.recv()).await {
            panic!(
                "unexpected ListAndWatch update {v:?} (before: {:?})",
                self.last
            );
        }
    }
}

// ---- the plugin process and the host ------------------------------------

struct Plugin {
    child: Option<Child>,
    log: PathBuf,
}

impl Plugin {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the exit code.
    fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the plugin ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- plugin log ----\n{}", self.log_text());
        }
    }
}

struct Host {
    fs: FakeSys,
    sim: SimKernel,
    d: Daemon,
    fifo: PathBuf,
    plugin_dir: TempDir,
}

impl Host {
    /// The standard fake host: the NIC on NUMA node 0, the GPU (with its
    /// audio function in IOMMU group 1) on node 1, the T4 (already on
    /// vfio-pci) with no node. nic0 is an intel.com/e1000e, gpu-a and
    /// gpu-b are nvidia.com/gpu; the AMD GPU is registered untagged.
    fn new() -> Host {
        Host::on(FakeSys::standard_host())
    }

    /// The standard host, but the NIC has an FLR, so vfiod resets it when
    /// it is released.
    fn with_resettable_nic() -> Host {
        Host::on(FakeSys::with_devices(
            FakeSys::standard_devices().into_iter().map(|spec| {
                if spec.addr == NIC {
                    spec.reset_methods("flr")
                } else {
                    spec
                }
            }),
        ))
    }

    fn on(fs: FakeSys) -> Host {
        set_numa(&fs, NIC, 0);
        set_numa(&fs, GPU, 1);
        let sim = SimKernel::start(&fs);
        let fifo = fs.tmp_root().join("uevents");
        let fifo_arg = fifo.display().to_string();
        let d = Daemon::start(&fs, &["--uevent-fifo", &fifo_arg]);
        for (addr, name, resource) in [
            (NIC, "nic0", Some(NIC_RES)),
            (GPU, "gpu-a", Some(GPU_RES)),
            (T4, "gpu-b", Some(GPU_RES)),
            (AMD, "amd", None),
        ] {
            let tags = resource
                .map(|r| format!(r#","tags":{{"resource":"{r}"}}"#))
                .unwrap_or_default();
            let r = d.post(
                "/devices",
                &format!(r#"{{"pci_address":"{addr}","name":"{name}"{tags}}}"#),
            );
            assert_eq!(r.status, 201, "{}", r.body);
        }
        Host {
            fs,
            sim,
            d,
            fifo,
            plugin_dir: TempDir::new("device-plugins").unwrap(),
        }
    }

    fn dir(&self) -> &Path {
        self.plugin_dir.path()
    }

    fn plugin(&self, extra: &[&str]) -> Plugin {
        let log = self.fs.tmp_root().join("plugin.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfiod-kubelet-plugin"));
        cmd.arg("--vfiod-socket")
            .arg(&self.d.socket)
            .arg("--plugin-dir")
            .arg(self.dir())
            .arg("--sysfs")
            .arg(&self.fs.sysfs)
            .arg("--devfs")
            .arg(&self.fs.devfs)
            .arg("--log-level")
            .arg("info,vfiod_kubelet_plugin=debug")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log_file);
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        Plugin {
            child: Some(cmd.spawn().expect("spawn vfiod-kubelet-plugin")),
            log,
        }
    }

    fn uevent(&self, line: &str) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.fifo)
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }

    fn device(&self, name: &str) -> serde_json::Value {
        blocking(|| self.d.get(&format!("/devices/{name}")).json())
    }
}

fn set_numa(fs: &FakeSys, addr: &str, node: i64) {
    let path = fs.path(&format!("bus/pci/devices/{addr}/numa_node"));
    std::fs::write(path, format!("{node}\n")).unwrap();
}

/// Registration, options and the first list of each resource.
async fn connect_all(
    kubelet: &mut Kubelet,
) -> BTreeMap<String, (RegisterRequest, DevicePluginClient<Channel>, Watch, View)> {
    let regs = kubelet.registrations(2).await;
    let mut out = BTreeMap::new();
    for (resource, r) in regs {
        let mut client = kubelet.dial(&r).await;
        let options = client
            .get_device_plugin_options(Empty {})
            .await
            .expect("GetDevicePluginOptions")
            .into_inner();
        assert_eq!(
            options,
            DevicePluginOptions {
                pre_start_required: false,
                get_preferred_allocation_available: true
            }
        );
        let mut watch = Watch::open(&mut client).await;
        let (_, first) = watch.next().await.expect("a first list");
        out.insert(resource, (r, client, watch, first));
    }
    out
}

fn initial_gpu_view() -> View {
    expect_view(&[("gpu-a", "Healthy@1"), ("gpu-b", "Healthy")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registers_per_resource_and_list_and_watch_follows_unplug_replug_and_a_stuck_move() {
    let h = Host::new();
    let mut kubelet = Kubelet::start(h.dir());
    let _plugin = h.plugin(&[]);
    let mut eps = connect_all(&mut kubelet).await;

    // One registration per resource: v1beta1, its own socket, the options.
    let names: Vec<&String> = eps.keys().collect();
    assert_eq!(
        names,
        [NIC_RES, GPU_RES],
        "the untagged AMD GPU is not advertised"
    );
    for (resource, (r, _, _, _)) in &eps {
        assert_eq!(r.version, "v1beta1");
        assert_eq!(&r.resource_name, resource);
        assert!(h.dir().join(&r.endpoint).exists(), "{}", r.endpoint);
        assert_eq!(
            r.options,
            Some(DevicePluginOptions {
                pre_start_required: false,
                get_preferred_allocation_available: true
            })
        );
    }
    assert_ne!(eps[NIC_RES].0.endpoint, eps[GPU_RES].0.endpoint);
    // Device IDs are vfiod's names; NUMA nodes from sysfs (-1: none).
    assert_eq!(eps[GPU_RES].3, initial_gpu_view());
    assert_eq!(eps[NIC_RES].3, expect_view(&[("nic0", "Healthy@0")]));

    let (_, _, nic_watch, _) = eps.get_mut(NIC_RES).unwrap();

    // Unplug: kubelet sees nic0 Unhealthy within a second of the uevent.
    h.fs.remove_device(NIC);
    let sent = Instant::now();
    h.uevent(&format!("remove {NIC}"));
    let (at, v) = nic_watch
        .until("nic0 unhealthy", |v| v["nic0"] == "Unhealthy")
        .await;
    let unplug_latency = at - sent;
    assert_eq!(v, expect_view(&[("nic0", "Unhealthy")]));

    // Re-plug: Healthy again, with its NUMA node read afresh.
    h.fs.add_device(FakeSys::standard_device(NIC));
    set_numa(&h.fs, NIC, 0);
    let sent = Instant::now();
    h.uevent(&format!("add {NIC}"));
    let (at, v) = nic_watch
        .until("nic0 healthy", |v| v["nic0"] == "Healthy@0")
        .await;
    let replug_latency = at - sent;
    assert_eq!(v, expect_view(&[("nic0", "Healthy@0")]));

    // A move stuck in the kernel: Unhealthy once vfiod gives up waiting
    // (its op timeout is 3 s in these tests), Healthy when the kernel
    // returns.
    h.sim.hang_write("bus/pci/drivers/e1000e/unbind");
    let socket = h.d.socket.clone();
    let bind = std::thread::spawn(move || {
        common::request(&socket, "POST", "/devices/nic0/bind", Some("{}"))
    });
    nic_watch
        .until("nic0 stuck", |v| v["nic0"] == "Unhealthy@0")
        .await;
    let stuck = h.device("nic0");
    assert_eq!(stuck["stuck"], true, "{stuck}");
    let bind_answer = blocking(|| bind.join().unwrap());
    bind_answer.expect_error(504, "driver_timeout");
    blocking(|| h.sim.release("bus/pci/drivers/e1000e/unbind"));
    let sent = Instant::now();
    let (at, _) = nic_watch
        .until("nic0 unstuck", |v| v["nic0"] == "Healthy@0")
        .await;
    let unstuck_latency = at - sent;

    // The GPU endpoint sent nothing all along: none of its devices changed.
    let (_, _, gpu_watch, _) = eps.get_mut(GPU_RES).unwrap();
    gpu_watch.quiet_for(Duration::from_millis(300)).await;
    assert_eq!(gpu_watch.updates, 1);

    eprintln!(
        "kubelet saw: unplug after {unplug_latency:?}, re-plug after {replug_latency:?}, \
         the end of a stuck move {unstuck_latency:?} after the kernel returned"
    );
    for (what, latency) in [("unplug", unplug_latency), ("re-plug", replug_latency)] {
        assert!(
            latency < KUBELET_SEES_WITHIN,
            "kubelet saw the {what} after {latency:?}"
        );
    }

    // Endpoints follow the resources: a new tag value makes a new
    // endpoint; the old one sends an empty list and ends.
    let r = blocking(|| {
        h.d.req(
            "PATCH",
            "/devices/nic0",
            Some(r#"{"tags":{"resource":"intel.com/nic"}}"#),
        )
    });
    assert_eq!(r.status, 200, "{}", r.body);
    let reg = kubelet.next_registration().await;
    assert_eq!(reg.resource_name, "intel.com/nic");
    let mut client = kubelet.dial(&reg).await;
    let mut w = Watch::open(&mut client).await;
    assert_eq!(
        w.next().await.unwrap().1,
        expect_view(&[("nic0", "Healthy@0")])
    );
    let (_, _, nic_watch, _) = eps.get_mut(NIC_RES).unwrap();
    nic_watch.until("an empty list", |v| v.is_empty()).await;
    assert!(nic_watch.next().await.is_none(), "the old stream ends");
    let old_socket = h.dir().join(&eps[NIC_RES].0.endpoint);
    common::eventually(5, "the old endpoint's socket removed", || {
        (!old_socket.exists()).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allocate_moves_binds_and_attaches_and_returns_the_vfio_nodes_and_env() {
    let h = Host::new();
    let mut kubelet = Kubelet::start(h.dir());
    let _plugin = h.plugin(&["--with-group"]);
    let mut eps = connect_all(&mut kubelet).await;
    let (_, gpu, gpu_watch, _) = eps.get_mut(GPU_RES).unwrap();

    // One device: gpu-a (on a NUMA node) over gpu-b (none).
    let preferred = gpu
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: vec!["gpu-b".into(), "gpu-a".into()],
                must_include_device_i_ds: vec![],
                allocation_size: 1,
            }],
        })
        .await
        .expect("GetPreferredAllocation")
        .into_inner();
    assert_eq!(preferred.container_responses[0].device_i_ds, ["gpu-a"]);

    let allocate = |ids: &[&str]| AllocateRequest {
        container_requests: vec![ContainerAllocateRequest {
            devices_ids: ids.iter().map(|s| s.to_string()).collect(),
        }],
    };
    let started = Instant::now();
    let resp = gpu
        .allocate(allocate(&["gpu-a"]))
        .await
        .expect("Allocate")
        .into_inner();
    let first_allocate = started.elapsed();
    let c = &resp.container_responses[0];
    assert_eq!(
        c.envs
            .get("PCI_RESOURCE_NVIDIA_COM_GPU")
            .map(String::as_str),
        Some(GPU)
    );
    let specs: Vec<(&str, &str, &str)> = c
        .devices
        .iter()
        .map(|s| {
            (
                s.container_path.as_str(),
                s.host_path.as_str(),
                s.permissions.as_str(),
            )
        })
        .collect();
    let devfs = h.fs.devfs.display().to_string();
    assert_eq!(
        specs,
        [
            (
                "/dev/vfio/vfio",
                format!("{devfs}/vfio/vfio").as_str(),
                "mrw"
            ),
            ("/dev/vfio/1", format!("{devfs}/vfio/1").as_str(), "mrw"),
        ]
    );
    for s in &c.devices {
        assert!(
            Path::new(&s.host_path).exists(),
            "{} is missing",
            s.host_path
        );
    }
    // Bound (with its group's audio function) and attached.
    assert_eq!(h.fs.driver_of(GPU).as_deref(), Some("vfio-pci"));
    assert_eq!(h.fs.driver_of(GPU_AUDIO).as_deref(), Some("vfio-pci"));
    let dev = h.device("gpu-a");
    assert_eq!(dev["bound_to_vfio"], true);
    let first_instance = dev["attached_to"].as_str().unwrap().to_owned();
    assert!(
        first_instance.starts_with("kubelet:nvidia.com/gpu:") && first_instance.ends_with(":gpu-a"),
        "{first_instance}"
    );
    // Attached to kubelet's own allocation: still Healthy to kubelet.
    gpu_watch.quiet_for(Duration::from_millis(300)).await;

    // Kubelet gives gpu-a to the next pod: the earlier allocation ends, the
    // device stays on vfio and is attached anew. Timed over a few rounds.
    let mut again = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let resp = gpu
            .allocate(allocate(&["gpu-a"]))
            .await
            .expect("re-Allocate");
        again.push(started.elapsed());
        assert_eq!(resp.into_inner().container_responses[0].devices.len(), 2);
    }
    let dev = h.device("gpu-a");
    assert_ne!(dev["attached_to"].as_str().unwrap(), first_instance);
    assert_eq!(dev["bound_to_vfio"], true);

    // With iommufd, the kernel gives the T4 a device cdev and there is a
    // /dev/iommu: both are named too.
    std::fs::create_dir_all(h.fs.path(&format!("bus/pci/devices/{T4}/vfio-dev/vfio0"))).unwrap();
    std::fs::create_dir_all(h.fs.devfs.join("vfio/devices")).unwrap();
    std::fs::write(h.fs.devfs.join("vfio/devices/vfio0"), "").unwrap();
    std::fs::write(h.fs.devfs.join("iommu"), "").unwrap();

    // Both GPUs in one container: two groups, both addresses.
    let resp = gpu
        .allocate(allocate(&["gpu-a", "gpu-b"]))
        .await
        .expect("Allocate two")
        .into_inner();
    let c = &resp.container_responses[0];
    assert_eq!(c.envs["PCI_RESOURCE_NVIDIA_COM_GPU"], format!("{GPU},{T4}"));
    let paths: Vec<&str> = c
        .devices
        .iter()
        .map(|s| s.container_path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "/dev/vfio/vfio",
            "/dev/vfio/1",
            "/dev/vfio/4",
            "/dev/iommu",
            "/dev/vfio/devices/vfio0"
        ]
    );
    for s in &c.devices {
        assert!(
            Path::new(&s.host_path).exists(),
            "{} is missing",
            s.host_path
        );
        assert_eq!(s.permissions, "mrw");
    }

    // A device attached outside kubelet turns Unhealthy, and allocating it
    // anyway fails with vfiod's own message.
    let r = blocking(|| h.d.post("/devices/gpu-b/detach", r#"{"keep_bound":true}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = blocking(|| {
        h.d.post("/devices/gpu-b/attach", r#"{"instance_id":"vm-outside"}"#)
    });
    assert_eq!(r.status, 200, "{}", r.body);
    gpu_watch
        .until("gpu-b unhealthy", |v| v["gpu-b"] == "Unhealthy")
        .await;
    let vfiod_says = blocking(|| h.d.post("/devices/gpu-b/attach", r#"{"instance_id":"x"}"#));
    vfiod_says.expect_error(409, "in_use");
    let err = gpu
        .allocate(allocate(&["gpu-b"]))
        .await
        .expect_err("gpu-b is someone else's");
    assert!(
        err.message().contains(&vfiod_says.message()),
        "{:?} lacks vfiod's {:?}",
        err.message(),
        vfiod_says.message()
    );

    // A move that fails fails the allocation with vfiod's error, and
    // leaves the NIC on its driver and unattached.
    let (_, nic, _, _) = eps.get_mut(NIC_RES).unwrap();
    h.sim
        .fail_write("bus/pci/drivers/e1000e/unbind", Errno::EISDIR);
    let err = nic
        .allocate(allocate(&["nic0"]))
        .await
        .expect_err("the unbind fails");
    let vfiod_says = blocking(|| h.d.post("/devices/nic0/bind", "{}"));
    vfiod_says.expect_error(500, "bind_failed");
    assert!(
        err.message().contains(&vfiod_says.message()),
        "{:?} lacks vfiod's {:?}",
        err.message(),
        vfiod_says.message()
    );
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("e1000e"));
    assert!(h.device("nic0")["attached_to"].is_null());
    // An id that is not this resource's is refused before anything moves.
    let err = nic.allocate(allocate(&["gpu-a"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    again.sort();
    eprintln!(
        "Allocate: {first_allocate:?} with the move to vfio (GPU + audio function, fake sysfs); \
         re-allocating a bound device: median {:?}, max {:?} over {} rounds",
        again[again.len() / 2],
        again[again.len() - 1],
        again.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubelet_and_vfiod_restarts_lead_to_registration_again_and_change_no_device() {
    let mut h = Host::new();
    let mut kubelet = Kubelet::start(h.dir());
    let mut plugin = h.plugin(&[]);
    let eps = connect_all(&mut kubelet).await;
    let before: BTreeMap<String, View> =
        eps.iter().map(|(k, v)| (k.clone(), v.3.clone())).collect();
    drop(eps);

    // Kubelet restarts: its socket goes, the directory is cleared, a new
    // kubelet.sock appears. Every resource registers again, same devices.
    kubelet.stop().await;
    let mut kubelet = Kubelet::start(h.dir());
    let restarted = Instant::now();
    let mut eps = connect_all(&mut kubelet).await;
    let reregistered = restarted.elapsed();
    for (resource, (_, _, _, list)) in &eps {
        assert_eq!(
            list, &before[resource],
            "{resource} after the kubelet restart"
        );
    }

    // vfiod restarts (killed, started again): kubelet sees each endpoint
    // register again and the same devices; no device turns Unhealthy.
    blocking(|| h.d.restart());
    let regs = kubelet.registrations(2).await;
    for (resource, (_, _, watch, _)) in eps.iter_mut() {
        // The old stream sent nothing different before kubelet moved on.
        while let Ok(Some(Update::List(_, v))) =
            tokio::time::timeout(Duration::from_millis(100), watch.rx.recv()).await
        {
            assert_eq!(v, before[resource], "{resource} during the vfiod restart");
        }
    }
    let mut watches = BTreeMap::new();
    for (resource, r) in &regs {
        let mut client = kubelet.dial(r).await;
        let mut w = Watch::open(&mut client).await;
        assert_eq!(w.next().await.unwrap().1, before[resource], "{resource}");
        watches.insert(resource.clone(), (client, w));
    }
    kubelet
        .no_registration_for(Duration::from_millis(500))
        .await;

    // And the plugin follows the new vfiod's events.
    let (_, nic_watch) = watches.get_mut(NIC_RES).unwrap();
    h.fs.remove_device(NIC);
    let sent = Instant::now();
    h.uevent(&format!("remove {NIC}"));
    let (at, _) = nic_watch
        .until("nic0 unhealthy", |v| v["nic0"] == "Unhealthy")
        .await;
    assert!(at - sent < KUBELET_SEES_WITHIN, "{:?}", at - sent);

    // SIGTERM: the plugin exits cleanly and takes its sockets with it.
    let endpoints: Vec<PathBuf> = regs.values().map(|r| h.dir().join(&r.endpoint)).collect();
    assert_eq!(plugin.terminate(), Some(0), "{}", plugin.log_text());
    for e in endpoints {
        assert!(!e.exists(), "{} left behind", e.display());
    }
    eprintln!("kubelet restart: both resources registered again {reregistered:?} after the new kubelet.sock");
}

// ---- kubelet's PodResources service ---------------------------------------

/// Kubelet's PodResources `List`: the pods it runs and the devices each
/// holds, as the test sets them.
/// pod name -> (resource, device ids)
type PodDevices = BTreeMap<String, (String, Vec<String>)>;

#[derive(Clone, Default)]
struct PodResourcesService {
    pods: std::sync::Arc<std::sync::Mutex<PodDevices>>,
}

#[tonic::async_trait]
impl PodResourcesLister for PodResourcesService {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        let pods = self.pods.lock().unwrap();
        let pod_resources = pods
            .iter()
            .map(|(name, (resource, ids))| PodResources {
                name: name.clone(),
                namespace: "default".into(),
                containers: vec![ContainerResources {
                    name: "compute".into(),
                    devices: vec![ContainerDevices {
                        resource_name: resource.clone(),
                        device_ids: ids.clone(),
                    }],
                }],
            })
            .collect();
        Ok(Response::new(ListPodResourcesResponse { pod_resources }))
    }
}

impl PodResourcesService {
    fn serve(&self, socket: &Path) -> CancellationToken {
        let listener = UnixListener::bind(socket).unwrap();
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        let service = self.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await
                .unwrap();
        });
        stop
    }

    fn set(&self, pod: &str, resource: &str, ids: &[&str]) {
        self.pods.lock().unwrap().insert(
            pod.into(),
            (resource.into(), ids.iter().map(|s| s.to_string()).collect()),
        );
    }

    fn end(&self, pod: &str) {
        self.pods.lock().unwrap().remove(pod);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_whose_pod_is_gone_is_released_and_reset_and_one_a_pod_holds_is_not() {
    let h = Host::with_resettable_nic();
    let mut kubelet = Kubelet::start(h.dir());
    let pod_socket = h.fs.tmp_root().join("pod-resources.sock");
    let pod_socket_arg = pod_socket.display().to_string();
    let plugin = h.plugin(&[
        "--pod-resources-socket",
        &pod_socket_arg,
        "--release-interval-ms",
        "100",
        "--release-grace-ms",
        "500",
    ]);
    let mut eps = connect_all(&mut kubelet).await;
    let (_, nic, _, _) = eps.get_mut(NIC_RES).unwrap();
    nic.allocate(AllocateRequest {
        container_requests: vec![ContainerAllocateRequest {
            devices_ids: vec!["nic0".into()],
        }],
    })
    .await
    .expect("Allocate");
    let attached_to = |h: &Host| h.device("nic0")["attached_to"].as_str().map(str::to_owned);
    let instance = attached_to(&h).expect("attached by Allocate");

    // No PodResources API to ask: nothing is released, however long.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(attached_to(&h).as_deref(), Some(instance.as_str()));
    assert!(
        plugin.log_text().contains("none is released"),
        "{}",
        plugin.log_text()
    );

    // Kubelet runs the pod: it stays attached past the grace time.
    let pods = PodResourcesService::default();
    pods.set("virt-launcher-vm-a", NIC_RES, &["nic0"]);
    let _server = pods.serve(&pod_socket);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(attached_to(&h).as_deref(), Some(instance.as_str()));
    let dev = h.device("nic0");
    assert!(dev["last_reset"].is_null(), "{dev}");

    // The pod ends: the device is released, stays on vfio, and vfiod
    // resets it on release (right after the detach has answered).
    pods.end("virt-launcher-vm-a");
    let started = Instant::now();
    let dev = loop {
        let dev = h.device("nic0");
        if dev["attached_to"].is_null() && !dev["last_reset"].is_null() {
            break dev;
        }
        assert!(
            started.elapsed() < WAIT,
            "not released and reset 10 s after its pod ended: {dev}\n{}",
            plugin.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "released and reset {:?} after its pod ended",
        started.elapsed()
    );
    assert_eq!(dev["bound_to_vfio"], true, "{dev}");
    assert_eq!(dev["last_reset"]["result"], "ok", "{dev}");
    assert_eq!(dev["health"], "ok", "{dev}");
    assert_eq!(h.fs.driver_of(NIC).as_deref(), Some("vfio-pci"));
    assert!(plugin.log_text().contains("no pod holds it"));
}
