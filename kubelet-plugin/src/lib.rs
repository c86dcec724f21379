//! vfiod-kubelet-plugin: advertises vfiod's tagged devices to kubelet as
//! extended resources and moves them to vfio when kubelet allocates them.

pub mod allocate;
pub mod follow;
pub mod inventory;
pub mod plugin;
pub mod prefer;
pub mod release;
pub mod vfiod;

/// The Device Plugin API v1beta1, generated from proto/deviceplugin.proto.
pub mod api {
    tonic::include_proto!("v1beta1");
}

/// The part of kubelet's PodResources API v1 the plugin reads, generated
/// from proto/podresources.proto.
pub mod podresources {
    tonic::include_proto!("v1");
}
