//! A fake `/proc` tree for the holder scan, in a fresh temporary directory.
//!
//! Layout (P = `FakeProc::root`):
//!
//! ```text
//! P/<pid>/comm status cgroup maps
//! P/<pid>/fd/<n>      -> target (a path, `socket:[…]`, `anon_inode:[…]`: any text)
//! P/<pid>/fdinfo/<n>  (for VFIO device descriptors)
//! P/1/mountinfo  P/self/mountinfo  P/swaps
//! P/net/{if_inet6,route,ipv6_route}
//! P/driver/nvidia/gpus/<addr>/information
//! ```
//!
//! Device numbers without `mknod` (no root needed): the scan stats a
//! descriptor, which follows the `fd/<n>` symlink. A fake device node is a
//! symlink in the fake devfs to a real character node of this machine
//! (`/dev/zero` is 1:5, `/dev/full` 1:7, ...), and the fake sysfs `dev`
//! file of the device names that node's `major:minor`: the stat then gives
//! the right file type and `st_rdev`, while `readlink` of the descriptor
//! shows the fake path. Only nodes every Linux system (containers
//! included) has are used, never opened, only stat'ed. `/dev/null` is left
//! to the background noise every process holds.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::fakesys::{assert_not_real_sysfs, TempDir};

/// `major:minor` of a real character node, as a sysfs `dev` file says it.
pub fn dev_numbers(real_node: &str) -> String {
    let meta = fs::metadata(real_node).unwrap_or_else(|e| panic!("stat {real_node}: {e}"));
    assert!(
        meta.file_type().is_char_device(),
        "{real_node} is not a character node"
    );
    let rdev = meta.rdev();
    format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    )
}

/// Makes `link` (inside a temporary tree) a fake device node: a symlink to
/// the real node `real_node`, replacing whatever was there.
pub fn alias_node(link: &Path, real_node: &str) {
    assert_not_real_sysfs(link);
    assert!(
        link.starts_with(std::env::temp_dir()) && !link.starts_with("/dev"),
        "fakeproc: refusing to create {} outside a temporary tree",
        link.display()
    );
    fs::create_dir_all(link.parent().expect("node has a parent")).expect("fakeproc: node dir");
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link).expect("fakeproc: replace node");
    }
    std::os::unix::fs::symlink(real_node, link).expect("fakeproc: node link");
}

pub struct FakeProc {
    pub root: PathBuf,
    _tmp: TempDir,
}

impl Default for FakeProc {
    fn default() -> Self {
        FakeProc::new()
    }
}

impl FakeProc {
    /// An empty `/proc`: no processes, a mount table with `/` only, no
    /// swap, no routes.
    pub fn new() -> FakeProc {
        let tmp = TempDir::new("vfiod-fakeproc").expect("fakeproc: temporary directory");
        let root = tmp.path().join("proc");
        let proc = FakeProc { root, _tmp: tmp };
        proc.write(
            "1/mountinfo",
            "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n",
        );
        proc.write(
            "swaps",
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n",
        );
        proc.write("net/if_inet6", "");
        proc.write(
            "net/route",
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n",
        );
        proc.write("net/ipv6_route", "");
        proc
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Writes `content` at `rel` under the root, creating directories.
    pub fn write(&self, rel: &str, content: &str) {
        let path = self.root.join(rel);
        fs::create_dir_all(path.parent().expect("has a parent")).expect("fakeproc: mkdir");
        fs::write(&path, content).expect("fakeproc: write");
    }

    /// Appends a line to `rel`.
    pub fn append_line(&self, rel: &str, line: &str) {
        let path = self.root.join(rel);
        let mut text = fs::read_to_string(&path).unwrap_or_default();
        text.push_str(line);
        text.push('\n');
        fs::write(&path, text).expect("fakeproc: append");
    }

    pub fn nvidia_gpu(&self, addr: &str, minor: u32) {
        self.write(
            &format!("driver/nvidia/gpus/{addr}/information"),
            &format!("Model: \t\t Tesla T4\nIRQ:   \t\t 42\nGPU UUID: \t GPU-0\nDevice Minor: \t {minor}\nBus Location: \t {addr}\n"),
        );
    }

    /// A process with no descriptors, uid 0, in `system.slice/<comm>.service`.
    pub fn process(&self, pid: u32, comm: &str) -> FakeProcess {
        let dir = self.root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).expect("fakeproc: fd dir");
        fs::create_dir_all(dir.join("fdinfo")).expect("fakeproc: fdinfo dir");
        let process = FakeProcess { dir, next_fd: 0 };
        process.write("comm", &format!("{comm}\n"));
        process.uid(0);
        process.write("cgroup", &format!("0::/system.slice/{comm}.service\n"));
        process.write("maps", "");
        process
    }
}

pub struct FakeProcess {
    pub dir: PathBuf,
    next_fd: u32,
}

impl FakeProcess {
    fn write(&self, rel: &str, content: &str) {
        fs::write(self.dir.join(rel), content).expect("fakeproc: write");
    }

    pub fn uid(&self, uid: u32) -> &Self {
        self.write(
            "status",
            &format!("Name:\tx\nState:\tS (sleeping)\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n"),
        );
        self
    }

    pub fn cgroup(&self, content: &str) -> &Self {
        self.write("cgroup", content);
        self
    }

    /// A descriptor whose `readlink` is `target` (any text); returns its
    /// number.
    pub fn fd(&mut self, target: impl AsRef<Path>) -> u32 {
        let n = self.next_fd;
        self.next_fd += 1;
        std::os::unix::fs::symlink(target, self.dir.join("fd").join(n.to_string()))
            .expect("fakeproc: fd link");
        n
    }

    /// A VFIO device descriptor; its `fdinfo` names `syspath` when given
    /// (kernel 6.18 and later), as the kernel prints it.
    pub fn vfio_device_fd(&mut self, syspath: Option<&str>) -> u32 {
        let n = self.fd("anon_inode:[vfio-device]");
        let mut info = String::from("pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n");
        if let Some(syspath) = syspath {
            info.push_str(&format!("vfio-device-syspath: {syspath}\n"));
        }
        fs::write(self.dir.join("fdinfo").join(n.to_string()), info).expect("fakeproc: fdinfo");
        n
    }

    /// A mapping of `path` (as `maps` prints it).
    pub fn map(&self, path: &str) {
        let mut maps = fs::read_to_string(self.dir.join("maps")).unwrap_or_default();
        maps.push_str(&format!(
            "7f3a1c000000-7f3a1d000000 rw-s 00000000 00:15 4242                       {path}\n"
        ));
        self.write("maps", &maps);
    }

    /// Sets `maps` to `content` (a realistic background).
    pub fn maps(&self, content: &str) {
        self.write("maps", content);
    }

    /// The process exits: its directory disappears.
    pub fn exit(self) {
        fs::remove_dir_all(&self.dir).expect("fakeproc: remove process");
    }
}
