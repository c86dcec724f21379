//! The addresses of the standard host's devices
//! ([`FakeSys::standard_host`](crate::fakesys::FakeSys::standard_host),
//! built from [`FakeSys::standard_devices`](crate::fakesys::FakeSys::standard_devices)):
//!
//! ```text
//! 00:00.0 HOST_BRIDGE                        group 0
//! 00:01.0 ROOT_PORT (pcieport) ── 01:00.0 GPU (nvidia)               group 1
//!                              └─ 01:00.1 GPU_AUDIO (snd_hda_intel)  group 1
//! 00:02.0 NIC (e1000e)                       group 2
//! 00:03.0 EDU (QEMU's edu, no driver)        group 3
//! 00:04.0 T4 (already on vfio-pci)           group 4
//! 00:05.0 AMD (amdgpu)                       group 5
//! 00:06.0 NVME (nvme)                        group 6
//! ```
//!
//! A test that builds its own host with a device of the same kind at the
//! same address names it with these too.

/// Host bridge, no driver, group 0.
pub const HOST_BRIDGE: &str = "0000:00:00.0";
/// PCIe root port (pcieport) above the GPU and its audio function, group 1.
pub const ROOT_PORT: &str = "0000:00:01.0";
/// NVIDIA GPU 10de:2236 on nvidia, behind [`ROOT_PORT`], group 1.
pub const GPU: &str = "0000:01:00.0";
/// The GPU's HDMI audio function 10de:1aef on snd_hda_intel, group 1.
pub const GPU_AUDIO: &str = "0000:01:00.1";
/// Intel NIC 8086:10d3 on e1000e, group 2.
pub const NIC: &str = "0000:00:02.0";
/// QEMU's edu device 1234:11e8, no driver, group 3.
pub const EDU: &str = "0000:00:03.0";
/// Tesla T4 10de:1eb8, already on vfio-pci, group 4 (`/dev/vfio/4`).
pub const T4: &str = "0000:00:04.0";
/// AMD GPU 1002:73bf on amdgpu, group 5.
pub const AMD: &str = "0000:00:05.0";
/// Samsung NVMe 144d:a808 on nvme, group 6.
pub const NVME: &str = "0000:00:06.0";
