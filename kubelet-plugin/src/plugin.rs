//! The kubelet side: one Device Plugin endpoint per resource, each a gRPC
//! server on its own socket in the device-plugins directory, registered
//! with kubelet's `Registration` service on `kubelet.sock`.
//!
//! Kubelet, when it starts, deletes every socket in that directory and
//! creates `kubelet.sock` anew; it then knows no plugin until each
//! registers again. So the manager watches (by polling, every
//! [`WATCH_PERIOD`]) the identity of `kubelet.sock` and the presence of
//! its own sockets: a new kubelet.sock or a missing endpoint socket
//! restarts the endpoints and registers them again. A vfiod reconnection
//! (see [`crate::follow`]) registers them again too, which makes kubelet
//! dial them anew. Endpoints come and go as resources do in the inventory.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::allocate::Allocator;
use crate::api::device_plugin_server::{DevicePlugin, DevicePluginServer};
use crate::api::registration_client::RegistrationClient;
use crate::api::{
    AllocateRequest, AllocateResponse, ContainerPreferredAllocationResponse, Device,
    DevicePluginOptions, Empty, ListAndWatchResponse, NumaNode, PreStartContainerRequest,
    PreStartContainerResponse, PreferredAllocationRequest, PreferredAllocationResponse,
    RegisterRequest, TopologyInfo,
};
use crate::inventory::{endpoint_socket_name, Inventory, HEALTHY, UNHEALTHY};
use crate::vfiod::VfiodClient;

pub const API_VERSION: &str = "v1beta1";
const WATCH_PERIOD: Duration = Duration::from_millis(200);
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Allocations and releases change this plugin's attachments one at a time,
/// so that a release, which decides on what it read a moment before, never
/// detaches an allocation made after it looked.
pub type AttachmentLock = Arc<tokio::sync::Mutex<()>>;

pub struct Settings {
    pub plugin_dir: PathBuf,
    pub kubelet_socket: PathBuf,
    pub sysfs: PathBuf,
    pub devfs: PathBuf,
    pub with_group: bool,
}

pub fn options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

/// What kubelet is told about a resource's devices.
pub fn device_list(inventory: &Inventory, resource: &str) -> Vec<Device> {
    inventory
        .devices(resource)
        .iter()
        .map(|d| Device {
            id: d.id.clone(),
            health: if d.healthy { HEALTHY } else { UNHEALTHY }.into(),
            topology: d.numa_node.map(|n| TopologyInfo {
                nodes: vec![NumaNode { id: n }],
            }),
        })
        .collect()
}

struct Endpoint {
    resource: String,
    vfiod: VfiodClient,
    settings: Arc<Settings>,
    inventory: watch::Receiver<Arc<Inventory>>,
    attachments: AttachmentLock,
    stop: CancellationToken,
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for Endpoint {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceStream;

    /// The whole list at once, then again on every change of this
    /// resource's devices, until kubelet hangs up or the endpoint stops.
    /// An endpoint stops when its resource is gone, and the change that
    /// removed it is sent first (an empty list), so kubelet drops the
    /// devices at once instead of after its grace period.
    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let mut inventory = self.inventory.clone();
        let resource = self.resource.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let mut last: Option<Vec<Device>> = None;
            let mut stopping = false;
            loop {
                let list = device_list(&inventory.borrow_and_update(), &resource);
                if last.as_ref() != Some(&list) {
                    tracing::info!(resource = %resource, devices = ?list.iter().map(|d| format!("{}={}", d.id, d.health)).collect::<Vec<_>>(), "ListAndWatch update");
                    let update = ListAndWatchResponse {
                        devices: list.clone(),
                    };
                    if tx.send(Ok(update)).await.is_err() {
                        return;
                    }
                    last = Some(list);
                }
                if stopping {
                    return;
                }
                tokio::select! {
                    // The stop and the inventory change that caused it
                    // arrive together: take the change first.
                    biased;
                    changed = inventory.changed() => if changed.is_err() { return },
                    _ = stop.cancelled() => stopping = true,
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let inventory = self.inventory.borrow().clone();
        let devices = inventory.devices(&self.resource);
        let container_responses = request
            .into_inner()
            .container_requests
            .iter()
            .map(|r| ContainerPreferredAllocationResponse {
                device_i_ds: crate::prefer::preferred(
                    devices,
                    &r.available_device_i_ds,
                    &r.must_include_device_i_ds,
                    usize::try_from(r.allocation_size).unwrap_or(0),
                ),
            })
            .collect();
        Ok(Response::new(PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let inventory = self.inventory.borrow().clone();
        let _one_at_a_time = self.attachments.lock().await;
        let allocator = Allocator {
            vfiod: &self.vfiod,
            resource: &self.resource,
            with_group: self.settings.with_group,
            sysfs: &self.settings.sysfs,
            devfs: &self.settings.devfs,
        };
        let mut container_responses = Vec::new();
        for c in request.into_inner().container_requests {
            container_responses.push(
                allocator
                    .allocate_container(&inventory, &c.devices_ids)
                    .await?,
            );
        }
        Ok(Response::new(AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

/// A running endpoint server.
struct Running {
    socket: PathBuf,
    stop: CancellationToken,
    task: JoinHandle<()>,
    registered: bool,
    /// A failed registration was warned about; the next ones are debug
    /// lines until one succeeds.
    warned: bool,
}

impl Running {
    async fn shut_down(self) {
        self.stop.cancel();
        let _ = self.task.await;
        let _ = tokio::fs::remove_file(&self.socket).await;
    }
}

pub struct Manager {
    pub settings: Arc<Settings>,
    pub vfiod: VfiodClient,
    pub inventory: watch::Receiver<Arc<Inventory>>,
    pub reconnects: watch::Receiver<u64>,
    pub attachments: AttachmentLock,
}

/// Identity of a socket file, to notice it being recreated.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Manager {
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        let mut kubelet: Option<(u64, u64)> = None;
        let mut tick = tokio::time::interval(WATCH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut register_all = false;
            tokio::select! {
                _ = tick.tick() => {}
                r = self.inventory.changed() => if r.is_err() { break },
                r = self.reconnects.changed() => { if r.is_err() { break } register_all = true; }
                _ = cancel.cancelled() => break,
            }
            let now = file_identity(&self.settings.kubelet_socket);
            if now != kubelet {
                match now {
                    Some(_) if kubelet.is_some() => tracing::info!(
                        "kubelet.sock was recreated (kubelet restarted); restarting the endpoints"
                    ),
                    Some(_) => tracing::info!("kubelet.sock is there; registering"),
                    None => {
                        tracing::warn!(socket = %self.settings.kubelet_socket.display(), "kubelet.sock is gone; waiting for kubelet")
                    }
                }
                kubelet = now;
                for (_, r) in std::mem::take(&mut running) {
                    r.shut_down().await;
                }
            }
            if kubelet.is_none() {
                continue;
            }
            let inventory = self.inventory.borrow().clone();
            let gone: Vec<String> = running
                .iter()
                .filter(|(res, r)| !inventory.resources.contains_key(*res) || !r.socket.exists())
                .map(|(res, _)| res.clone())
                .collect();
            for res in gone {
                let r = running.remove(&res).expect("listed");
                if inventory.resources.contains_key(&res) {
                    tracing::info!(resource = %res, "endpoint socket was removed; restarting it");
                } else {
                    tracing::info!(resource = %res, "no device carries {res} any more; stopping its endpoint");
                }
                r.shut_down().await;
            }
            for res in inventory.resources.keys() {
                if !running.contains_key(res) {
                    match self.start(res) {
                        Ok(r) => {
                            running.insert(res.clone(), r);
                        }
                        Err(e) => {
                            tracing::error!(resource = %res, "cannot start its endpoint: {e}")
                        }
                    }
                }
            }
            for (res, r) in running.iter_mut() {
                if register_all {
                    r.registered = false;
                }
                if !r.registered {
                    match register(&self.settings.kubelet_socket, &r.socket, res).await {
                        Ok(()) => {
                            tracing::info!(resource = %res, endpoint = %r.socket.display(), "registered with kubelet");
                            r.registered = true;
                            r.warned = false;
                        }
                        Err(e) if !r.warned => {
                            tracing::warn!(resource = %res, "registration with kubelet failed (retrying every {} ms): {e}", WATCH_PERIOD.as_millis());
                            r.warned = true;
                        }
                        Err(e) => {
                            tracing::debug!(resource = %res, "registration with kubelet failed again: {e}");
                        }
                    }
                }
            }
        }
        for (_, r) in running {
            r.shut_down().await;
        }
    }

    fn start(&self, resource: &str) -> std::io::Result<Running> {
        let socket = self
            .settings
            .plugin_dir
            .join(endpoint_socket_name(resource));
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&socket).map_err(|e| {
            std::io::Error::new(e.kind(), format!("binding {}: {e}", socket.display()))
        })?;
        let stop = CancellationToken::new();
        let endpoint = Endpoint {
            resource: resource.to_owned(),
            vfiod: self.vfiod.clone(),
            settings: self.settings.clone(),
            inventory: self.inventory.clone(),
            attachments: self.attachments.clone(),
            stop: stop.clone(),
        };
        let shutdown = stop.clone();
        let name = resource.to_owned();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(endpoint))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await;
            if let Err(e) = served {
                tracing::error!(resource = %name, "endpoint server failed: {e}");
            }
        });
        tracing::info!(resource = %resource, socket = %socket.display(), "endpoint listening");
        Ok(Running {
            socket,
            stop,
            task,
            registered: false,
            warned: false,
        })
    }
}

/// Dials a gRPC server on a Unix socket (the URI is a placeholder).
pub async fn dial(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_owned();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

async fn register(kubelet_socket: &Path, endpoint: &Path, resource: &str) -> Result<(), String> {
    let call = async {
        let channel = dial(kubelet_socket)
            .await
            .map_err(|e| format!("dialing {}: {e}", kubelet_socket.display()))?;
        let endpoint_name = endpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        RegistrationClient::new(channel)
            .register(RegisterRequest {
                version: API_VERSION.into(),
                endpoint: endpoint_name,
                resource_name: resource.into(),
                options: Some(options()),
            })
            .await
            .map_err(|s| format!("kubelet refused: {}", s.message()))?;
        Ok(())
    };
    tokio::time::timeout(REGISTER_TIMEOUT, call)
        .await
        .map_err(|_| format!("no answer within {}s", REGISTER_TIMEOUT.as_secs()))?
}
