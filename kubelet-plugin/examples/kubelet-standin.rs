//! A minimal kubelet for the real-kernel tier's guest, which has no
//! Kubernetes: clears the device-plugins directory, serves `Registration`
//! on `kubelet.sock`, waits for RESOURCE to register, dials its endpoint,
//! reads the first ListAndWatch list and allocates the given devices.
//!
//!   kubelet-standin DIR RESOURCE DEVICE_ID... [--pod-resources SOCKET HOLD_MS]
//!
//! Prints `list ID HEALTH`, `allocate_ms MS`, `env NAME=VALUE` and
//! `spec CONTAINER_PATH HOST_PATH PERMISSIONS` lines; exits 1 with the
//! plugin's message when the allocation fails. With `--pod-resources` it
//! then also plays kubelet's PodResources API on SOCKET: a pod holds the
//! allocated devices for HOLD_MS (`pod_running`), then ends (`pod_ended
//! UNIX_MS`), and the stand-in keeps answering (with no pods) until killed.

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use vfiod_kubelet_plugin::api::device_plugin_client::DevicePluginClient;
use vfiod_kubelet_plugin::api::registration_server::{Registration, RegistrationServer};
use vfiod_kubelet_plugin::api::{
    AllocateRequest, ContainerAllocateRequest, Empty, RegisterRequest,
};
use vfiod_kubelet_plugin::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use vfiod_kubelet_plugin::podresources::{
    ContainerDevices, ContainerResources, ListPodResourcesRequest, ListPodResourcesResponse,
    PodResources,
};

struct Kubelet(mpsc::UnboundedSender<RegisterRequest>);

#[tonic::async_trait]
impl Registration for Kubelet {
    async fn register(&self, r: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let r = r.into_inner();
        if r.version != "v1beta1" {
            return Err(Status::invalid_argument("unsupported version"));
        }
        let _ = self.0.send(r);
        Ok(Response::new(Empty {}))
    }
}

/// One pod holding `held` devices of `resource`, while `held` is not empty.
#[derive(Clone)]
struct Pods {
    resource: String,
    held: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl PodResourcesLister for Pods {
    async fn list(
        &self,
        _: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        let held = self.held.lock().unwrap().clone();
        let pod_resources = if held.is_empty() {
            vec![]
        } else {
            vec![PodResources {
                name: "standin-pod".into(),
                namespace: "default".into(),
                containers: vec![ContainerResources {
                    name: "compute".into(),
                    devices: vec![ContainerDevices {
                        resource_name: self.resource.clone(),
                        device_ids: held,
                    }],
                }],
            }]
        };
        Ok(Response::new(ListPodResourcesResponse { pod_resources }))
    }
}

const USAGE: &str =
    "usage: kubelet-standin DIR RESOURCE DEVICE_ID... [--pod-resources SOCKET HOLD_MS]";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let pod_resources = match args.iter().position(|a| a == "--pod-resources") {
        Some(i) => {
            let tail = args.split_off(i);
            let [_, socket, hold_ms] = tail.as_slice() else {
                return Err(USAGE.into());
            };
            Some((
                PathBuf::from(socket),
                Duration::from_millis(hold_ms.parse()?),
            ))
        }
        None => None,
    };
    let [dir, resource, ids @ ..] = args.as_slice() else {
        return Err(USAGE.into());
    };
    let dir = PathBuf::from(dir);
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        if e.file_type()?.is_socket() {
            std::fs::remove_file(e.path())?;
        }
    }
    let listener = UnixListener::bind(dir.join("kubelet.sock"))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(Kubelet(tx)))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    let registration = loop {
        let r = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .map_err(|_| format!("{resource} did not register within 60 s"))?
            .ok_or("registration server ended")?;
        if &r.resource_name == resource {
            break r;
        }
    };
    let endpoint = dir.join(&registration.endpoint);
    let channel = vfiod_kubelet_plugin::plugin::dial(&endpoint).await?;
    let mut plugin = DevicePluginClient::new(channel);
    plugin.get_device_plugin_options(Empty {}).await?;
    let mut stream = plugin.list_and_watch(Empty {}).await?.into_inner();
    let list = stream.message().await?.ok_or("ListAndWatch ended")?;
    for d in &list.devices {
        println!("list {} {}", d.id, d.health);
    }
    let started = Instant::now();
    let response = plugin
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: ids.to_vec(),
            }],
        })
        .await;
    println!(
        "allocate_ms {:.1}",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let response = match response {
        Ok(r) => r.into_inner(),
        Err(s) => {
            println!("error {}", s.message());
            std::process::exit(1);
        }
    };
    for c in &response.container_responses {
        let mut envs: Vec<_> = c.envs.iter().collect();
        envs.sort();
        for (k, v) in envs {
            println!("env {k}={v}");
        }
        for s in &c.devices {
            println!(
                "spec {} {} {}",
                s.container_path, s.host_path, s.permissions
            );
        }
    }
    if let Some((socket, hold)) = pod_resources {
        let pods = Pods {
            resource: resource.clone(),
            held: Arc::new(Mutex::new(ids.to_vec())),
        };
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(pods.clone()))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        println!("pod_running");
        tokio::time::sleep(hold).await;
        pods.held.lock().unwrap().clear();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
        println!("pod_ended {now_ms}");
        std::future::pending::<()>().await;
    }
    Ok(())
}
