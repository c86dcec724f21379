//! Configuration: built-in defaults, then `/etc/vfiod/config.toml` (or
//! `--config FILE`), then command-line flags, each overriding the last.
//! As root the defaults are the system paths; as an ordinary user they move
//! under `$XDG_RUNTIME_DIR` and `$XDG_STATE_HOME` so the agent runs without
//! privileges (read-only towards the hardware).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/vfiod/config.toml";
pub const SYSTEM_SOCKET: &str = "/run/vfiod/vfiod.sock";
pub const SYSTEM_STATE_DIR: &str = "/var/lib/vfiod";
/// Persistent, because the rule matters at boot, before vfiod runs.
pub const DEFAULT_UDEV_RULES_DIR: &str = "/etc/udev/rules.d";

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub sysfs: PathBuf,
    pub devfs: PathBuf,
    /// procfs root: holders and VMM processes are looked up here.
    pub proc: PathBuf,
    /// Members of this group (and root) may change things.
    pub group: String,
    /// Upper bound for one sysfs write, and for the kernel to settle after it.
    pub op_timeout: Duration,
    /// `modprobe vfio-pci` when a bind needs it and it is not loaded.
    pub load_modules: bool,
    /// Where the generated udev rule goes that claims vfio devices at boot;
    /// empty disables it.
    pub udev_rules_dir: Option<PathBuf>,
    pub log_level: String,
    /// Take back a device that another actor moves off vfio while vfiod
    /// holds it there.
    pub reclaim: bool,
    /// Where `modules.alias` lives, for vfio variant drivers.
    pub modules_dir: PathBuf,
    /// Test hook: read uevents from this FIFO instead of netlink.
    pub uevent_fifo: Option<PathBuf>,
    /// `reset_on_release = "auto"`: reset a device after a detach and
    /// before giving back a device vfiod bound; `"never"`: do not.
    pub reset_on_release: bool,
    /// Consecutive failed resets after which a device is quarantined.
    pub quarantine_after: u32,
    /// When an attachment's VMM exits, also give the device back to its
    /// driver (by default it stays on vfio for the next VM).
    pub unbind_on_vmm_exit: bool,
    /// What one unprivileged uid, and all of them together, may hold.
    pub limits: crate::api::Limits,
    /// Time to deliver a request head, counted from when the connection
    /// starts waiting for one; so also the idle keep-alive timeout.
    pub header_timeout: Duration,
}

/// The file's shape: every key optional, unknown keys rejected so a typo is
/// an error rather than a silently ignored setting.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    sysfs: Option<PathBuf>,
    devfs: Option<PathBuf>,
    proc: Option<PathBuf>,
    group: Option<String>,
    op_timeout_ms: Option<u64>,
    load_modules: Option<bool>,
    udev_rules_dir: Option<PathBuf>,
    log_level: Option<String>,
    reclaim: Option<bool>,
    modules_dir: Option<PathBuf>,
    reset_on_release: Option<String>,
    quarantine_after: Option<u32>,
    unbind_on_vmm_exit: Option<bool>,
    max_connections_per_uid: Option<usize>,
    max_event_streams_per_uid: Option<usize>,
    max_unprivileged_connections: Option<usize>,
    header_timeout_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{0}")]
    Usage(String),
    #[error("config file {path}: {detail}")]
    File { path: PathBuf, detail: String },
}

pub const USAGE: &str = "\
vfiod: PCI passthrough host agent

Keeps a registry of PCI devices set aside for passthrough, moves them
between their native driver and vfio-pci on request, and serves an
HTTP+JSON API on a Unix socket (see vfioctl(1) for the client).

USAGE: vfiod [OPTIONS]

OPTIONS (override the config file):
  --config FILE        config file [default: /etc/vfiod/config.toml; missing is fine]
  --socket PATH        Unix socket to serve on
                       [root: /run/vfiod/vfiod.sock; others: $XDG_RUNTIME_DIR/vfiod/vfiod.sock]
  --state-dir DIR      where the registry lives
                       [root: /var/lib/vfiod; others: $XDG_STATE_HOME/vfiod]
  --sysfs DIR          sysfs root [default: /sys]; tests point it at a fake tree
  --devfs DIR          devfs root [default: /dev]
  --proc DIR           procfs root [default: /proc]; tests point it at a fake tree
  --group NAME         group whose members may change things [default: vfiod]
  --op-timeout-ms N    limit for one sysfs write or driver settle [default: 5000]
  --load-modules       modprobe vfio-pci when a bind needs it
  --udev-rules-dir DIR where to keep the boot-time udev rule ('' disables)
                       [default: /etc/udev/rules.d as root; disabled otherwise]
  --reclaim            take back a vfio device another actor moves away
  --reset-on-release auto|never
                       reset a device after detach and before giving it
                       back to its driver [default: auto]
  --quarantine-after N consecutive failed resets that quarantine a device
                       (1 to 1000) [default: 3]
  --unbind-on-vmm-exit give a device back to its driver when its VMM exits
                       [default: it stays on vfio for the next VM]
  --modules-dir DIR    where modules.alias names vfio variant drivers
                       [default: /lib/modules/$(uname -r)]
  --log-level LEVEL    error|warn|info|debug|trace [default: info]
  --max-connections-per-uid N
                       connections one unprivileged uid may hold [default: 64]
  --max-event-streams-per-uid N
                       GET /events streams one unprivileged uid may hold [default: 16]
  --max-unprivileged-connections N
                       connections all unprivileged uids together may hold
                       [default: 1024; less if the fd limit leaves no room]
  --header-timeout-ms N
                       time to send a request head, and to idle between
                       requests [default: 10000]
  --uevent-fifo PATH   read uevents from a FIFO instead of netlink (tests)
  -h, --help           this text
  -V, --version        print the version

Under systemd it takes the socket from vfiod.socket, notifies readiness
(Type=notify), pings the watchdog and logs to the journal.
";

/// What the command line asked for besides configuration.
#[derive(Debug, PartialEq)]
pub enum Invocation {
    Run(Box<Config>),
    Help,
    Version,
}

fn xdg_dir(var: &str, fallback_under_home: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(fallback_under_home)))
        .unwrap_or_else(std::env::temp_dir)
}

impl Config {
    pub fn defaults(is_root: bool) -> Config {
        let (socket, state_dir, udev_rules_dir) = if is_root {
            (
                PathBuf::from(SYSTEM_SOCKET),
                PathBuf::from(SYSTEM_STATE_DIR),
                Some(PathBuf::from(DEFAULT_UDEV_RULES_DIR)),
            )
        } else {
            (
                xdg_dir("XDG_RUNTIME_DIR", ".cache").join("vfiod/vfiod.sock"),
                xdg_dir("XDG_STATE_HOME", ".local/state").join("vfiod"),
                None,
            )
        };
        Config {
            socket,
            state_dir,
            sysfs: PathBuf::from("/sys"),
            devfs: PathBuf::from("/dev"),
            proc: PathBuf::from("/proc"),
            group: "vfiod".into(),
            op_timeout: Duration::from_millis(5000),
            load_modules: false,
            udev_rules_dir,
            log_level: "info".into(),
            reclaim: false,
            modules_dir: running_kernel_modules(),
            uevent_fifo: None,
            reset_on_release: true,
            quarantine_after: 3,
            unbind_on_vmm_exit: false,
            limits: crate::api::Limits::default(),
            header_timeout: crate::api::server::DEFAULT_HEADER_TIMEOUT,
        }
    }

    fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let file_err = |detail: String| ConfigError::File {
            path: path.to_owned(),
            detail,
        };
        let f: FileConfig =
            toml::from_str(text).map_err(|e| file_err(e.to_string().trim().to_owned()))?;
        if let Some(v) = f.socket {
            self.socket = v;
        }
        if let Some(v) = f.state_dir {
            self.state_dir = v;
        }
        if let Some(v) = f.sysfs {
            self.sysfs = v;
        }
        if let Some(v) = f.devfs {
            self.devfs = v;
        }
        if let Some(v) = f.proc {
            self.proc = v;
        }
        if let Some(v) = f.group {
            self.group = v;
        }
        if let Some(v) = f.op_timeout_ms {
            self.op_timeout = timeout_from_ms(v).map_err(file_err)?;
        }
        if let Some(v) = f.load_modules {
            self.load_modules = v;
        }
        if let Some(v) = f.udev_rules_dir {
            self.udev_rules_dir = (!v.as_os_str().is_empty()).then_some(v);
        }
        if let Some(v) = f.log_level {
            self.log_level = v;
        }
        if let Some(v) = f.reclaim {
            self.reclaim = v;
        }
        if let Some(v) = f.modules_dir {
            self.modules_dir = v;
        }
        if let Some(v) = f.reset_on_release {
            self.reset_on_release = reset_on_release(&v).map_err(file_err)?;
        }
        if let Some(v) = f.quarantine_after {
            self.quarantine_after = quarantine_after(v).map_err(file_err)?;
        }
        if let Some(v) = f.unbind_on_vmm_exit {
            self.unbind_on_vmm_exit = v;
        }
        if let Some(v) = f.max_connections_per_uid {
            self.limits.connections_per_uid = v;
        }
        if let Some(v) = f.max_event_streams_per_uid {
            self.limits.event_streams_per_uid = v;
        }
        if let Some(v) = f.max_unprivileged_connections {
            self.limits.unprivileged_connections = v;
        }
        if let Some(v) = f.header_timeout_ms {
            self.header_timeout = header_timeout_from_ms(v).map_err(file_err)?;
        }
        Ok(())
    }

    /// Parses `args` (without the program name), reading the config file
    /// they name or the default one.
    pub fn from_args(args: &[String], is_root: bool) -> Result<Invocation, ConfigError> {
        let mut config = Config::defaults(is_root);
        let config_path = flag_value(args, "--config")?;
        let (path, must_exist) = match config_path {
            Some(p) => (PathBuf::from(p), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => config.apply_file(&path, &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {}
            Err(e) => {
                return Err(ConfigError::File {
                    path,
                    detail: e.to_string(),
                })
            }
        }
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = || -> Result<String, ConfigError> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| ConfigError::Usage(format!("{flag} needs a value")))
            };
            match flag {
                "-h" | "--help" => return Ok(Invocation::Help),
                "-V" | "--version" => return Ok(Invocation::Version),
                "--config" => {
                    value()?;
                }
                "--socket" => config.socket = value()?.into(),
                "--state-dir" => config.state_dir = value()?.into(),
                "--sysfs" => config.sysfs = value()?.into(),
                "--devfs" => config.devfs = value()?.into(),
                "--proc" => config.proc = value()?.into(),
                "--group" => config.group = value()?,
                "--op-timeout-ms" => {
                    let v = value()?;
                    let ms = v.parse().map_err(|_| {
                        ConfigError::Usage(format!("--op-timeout-ms: not a number: {v:?}"))
                    })?;
                    config.op_timeout = timeout_from_ms(ms).map_err(ConfigError::Usage)?;
                }
                "--load-modules" => config.load_modules = true,
                "--reclaim" => config.reclaim = true,
                "--unbind-on-vmm-exit" => config.unbind_on_vmm_exit = true,
                "--modules-dir" => config.modules_dir = value()?.into(),
                "--reset-on-release" => {
                    config.reset_on_release =
                        reset_on_release(&value()?).map_err(ConfigError::Usage)?
                }
                "--quarantine-after" => {
                    let v = value()?;
                    let n = v.parse().map_err(|_| {
                        ConfigError::Usage(format!("--quarantine-after: not a number: {v:?}"))
                    })?;
                    config.quarantine_after = quarantine_after(n).map_err(ConfigError::Usage)?;
                }
                "--uevent-fifo" => config.uevent_fifo = Some(value()?.into()),
                "--udev-rules-dir" => {
                    let v = value()?;
                    config.udev_rules_dir = (!v.is_empty()).then(|| v.into());
                }
                "--log-level" => config.log_level = value()?,
                "--max-connections-per-uid" => {
                    config.limits.connections_per_uid = number(flag, &value()?)?
                }
                "--max-event-streams-per-uid" => {
                    config.limits.event_streams_per_uid = number(flag, &value()?)?
                }
                "--max-unprivileged-connections" => {
                    config.limits.unprivileged_connections = number(flag, &value()?)?
                }
                "--header-timeout-ms" => {
                    config.header_timeout = header_timeout_from_ms(number(flag, &value()?)?)
                        .map_err(ConfigError::Usage)?
                }
                other => {
                    return Err(ConfigError::Usage(format!(
                        "unknown argument {other:?}; see vfiod --help"
                    )))
                }
            }
        }
        if !matches!(
            config.log_level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace"
        ) {
            return Err(ConfigError::Usage(format!(
                "log level {:?} is not one of error, warn, info, debug, trace",
                config.log_level
            )));
        }
        config.limits.validate().map_err(ConfigError::Usage)?;
        Ok(Invocation::Run(Box::new(config)))
    }
}

fn running_kernel_modules() -> PathBuf {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    PathBuf::from("/lib/modules").join(release)
}

fn timeout_from_ms(ms: u64) -> Result<Duration, String> {
    if (10..=600_000).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err(format!("op_timeout_ms {ms} is outside 10..=600000"))
    }
}

fn reset_on_release(v: &str) -> Result<bool, String> {
    match v {
        "auto" => Ok(true),
        "never" => Ok(false),
        other => Err(format!(
            "reset_on_release {other:?} is not \"auto\" or \"never\""
        )),
    }
}

fn quarantine_after(n: u32) -> Result<u32, String> {
    if (1..=1000).contains(&n) {
        Ok(n)
    } else {
        Err(format!("quarantine_after {n} is outside 1..=1000"))
    }
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, ConfigError> {
    v.parse()
        .map_err(|_| ConfigError::Usage(format!("{flag}: not a number: {v:?}")))
}

fn header_timeout_from_ms(ms: u64) -> Result<Duration, String> {
    if (100..=600_000).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err(format!("header_timeout_ms {ms} is outside 100..=600000"))
    }
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> Result<Option<&'a str>, ConfigError> {
    for (i, arg) in args.iter().enumerate() {
        if arg == flag {
            return args
                .get(i + 1)
                .map(|v| Some(v.as_str()))
                .ok_or_else(|| ConfigError::Usage(format!("{flag} needs a value")));
        }
        if let Some(v) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn run(a: &[&str]) -> Result<Config, ConfigError> {
        match Config::from_args(&args(a), true)? {
            Invocation::Run(c) => Ok(*c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("vfiod-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "group = \"gpu-admins\"\nsocket = \"/tmp/a.sock\"\nop_timeout_ms = 900\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = run(&["--config", f, "--socket", "/tmp/b.sock"]).unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/b.sock"));
        assert_eq!(c.group, "gpu-admins");
        assert_eq!(c.op_timeout, Duration::from_millis(900));
        assert_eq!(c.state_dir, PathBuf::from(SYSTEM_STATE_DIR));
        assert!(c.reset_on_release);
        assert_eq!(c.quarantine_after, 3);
        std::fs::write(
            &file,
            "reset_on_release = \"never\"\nquarantine_after = 5\n",
        )
        .unwrap();
        let c = run(&["--config", f]).unwrap();
        assert!(!c.reset_on_release);
        assert_eq!(c.quarantine_after, 5);
        let c = run(&["--config", f, "--reset-on-release", "auto"]).unwrap();
        assert!(c.reset_on_release);
        std::fs::write(&file, "reset_on_release = \"sometimes\"\n").unwrap();
        assert!(matches!(
            run(&["--config", f]),
            Err(ConfigError::File { .. })
        ));
        std::fs::write(&file, "quarantine_after = 0\n").unwrap();
        assert!(matches!(
            run(&["--config", f]),
            Err(ConfigError::File { .. })
        ));
        std::fs::write(&file, "grup = \"typo\"\n").unwrap();
        let err = run(&["--config", f]).unwrap_err();
        assert!(
            err.to_string().contains("c.toml") && err.to_string().contains("grup"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        assert!(matches!(run(&["--bogus"]), Err(ConfigError::Usage(_))));
        assert!(matches!(run(&["--socket"]), Err(ConfigError::Usage(_))));
        assert!(matches!(
            run(&["--op-timeout-ms", "abc"]),
            Err(ConfigError::Usage(_))
        ));
        assert!(matches!(
            run(&["--op-timeout-ms", "0"]),
            Err(ConfigError::Usage(_))
        ));
        assert!(matches!(
            run(&["--config", "/nonexistent/x.toml"]),
            Err(ConfigError::File { .. })
        ));
        assert_eq!(
            run(&["--sysfs=/tmp/s"]).unwrap().sysfs,
            PathBuf::from("/tmp/s")
        );
    }

    #[test]
    fn the_packaged_file_shows_the_defaults() {
        let text = include_str!("../packaging/config.toml");
        let settings: String = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| !l.starts_with(' ') && l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(settings.contains("reset_on_release") && settings.contains("quarantine_after"));
        let mut c = Config::defaults(true);
        c.apply_file(Path::new("config.toml"), &settings).unwrap();
        assert_eq!(c, Config::defaults(true), "{settings}");
    }

    #[test]
    fn connection_limits_from_file_and_flags() {
        let dir = std::env::temp_dir().join(format!("vfiod-config-lim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "max_connections_per_uid = 8\nmax_event_streams_per_uid = 2\nheader_timeout_ms = 2500\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let c = run(&["--config", f, "--max-unprivileged-connections", "100"]).unwrap();
        assert_eq!(
            c.limits,
            crate::api::Limits {
                connections_per_uid: 8,
                event_streams_per_uid: 2,
                unprivileged_connections: 100,
            }
        );
        assert_eq!(c.header_timeout, Duration::from_millis(2500));
        assert!(matches!(
            run(&["--config", f, "--max-unprivileged-connections", "4"]),
            Err(ConfigError::Usage(m)) if m.contains("larger than")
        ));
        assert!(matches!(
            run(&["--max-connections-per-uid", "0"]),
            Err(ConfigError::Usage(_))
        ));
        assert!(matches!(
            run(&["--header-timeout-ms", "5"]),
            Err(ConfigError::Usage(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_root_defaults_live_under_xdg_dirs() {
        let c = Config::defaults(false);
        assert!(!c.socket.starts_with("/run/vfiod"));
        assert!(!c.state_dir.starts_with("/var/lib"));
        assert!(c.udev_rules_dir.is_none());
    }
}
