//! Configuration: built-in defaults, then `/etc/vfiod/config.toml` (or
//! `--config FILE`), then command-line flags, each overriding the last.
//! As root the defaults are the system paths; as an ordinary user they move
//! under `$XDG_RUNTIME_DIR` and `$XDG_STATE_HOME` so the agent runs without
//! privileges (read-only towards the hardware).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueHint};
use serde::Deserialize;

/// Read when present; `--config` names another, which must then exist.
pub const DEFAULT_CONFIG: &str = "/etc/vfiod/config.toml";
/// The socket when running as root; others get one under `$XDG_RUNTIME_DIR`.
pub const SYSTEM_SOCKET: &str = "/run/vfiod/vfiod.sock";
/// The registry's directory when running as root; others use
/// `$XDG_STATE_HOME/vfiod`.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/vfiod";
/// Persistent, because the rule matters at boot, before vfiod runs.
pub const DEFAULT_UDEV_RULES_DIR: &str = "/etc/udev/rules.d";

/// The daemon's settings: built-in defaults, then the config file, then flags,
/// each overriding the last.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The API's Unix socket (unless socket-activated).
    pub socket: PathBuf,
    /// Holds `state.json` and its lock; one daemon per directory.
    pub state_dir: PathBuf,
    /// Root of the sysfs tree; tests point it at a fake tree.
    pub sysfs: PathBuf,
    /// Root standing for `/dev`, where `vfio/N` nodes are awaited.
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
    /// One of `error`, `warn`, `info`, `debug`, `trace`; checked when the
    /// config is built.
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
    /// A TCP address that serves `GET /metrics` only (Prometheus cannot
    /// scrape a Unix socket); off unless set.
    pub metrics_listen: Option<SocketAddr>,
    /// Allow `metrics_listen` on an address other hosts can reach.
    pub metrics_listen_public: bool,
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
    metrics_listen: Option<SocketAddr>,
    metrics_listen_public: Option<bool>,
}

/// The command line as settings over the file's: a switch that is not
/// given leaves the file's value alone.
impl From<Flags> for FileConfig {
    fn from(f: Flags) -> FileConfig {
        FileConfig {
            socket: f.socket,
            state_dir: f.state_dir,
            sysfs: f.sysfs,
            devfs: f.devfs,
            proc: f.proc,
            group: f.group,
            op_timeout_ms: f.op_timeout_ms,
            load_modules: f.load_modules.then_some(true),
            udev_rules_dir: f.udev_rules_dir.map(PathBuf::from),
            log_level: f.log_level,
            reclaim: f.reclaim.then_some(true),
            modules_dir: f.modules_dir,
            reset_on_release: f.reset_on_release,
            quarantine_after: f.quarantine_after,
            unbind_on_vmm_exit: f.unbind_on_vmm_exit.then_some(true),
            max_connections_per_uid: f.max_connections_per_uid,
            max_event_streams_per_uid: f.max_event_streams_per_uid,
            max_unprivileged_connections: f.max_unprivileged_connections,
            header_timeout_ms: f.header_timeout_ms,
            metrics_listen: f.metrics_listen,
            metrics_listen_public: f.metrics_listen_public.then_some(true),
        }
    }
}

/// Why the daemon could not get a config; it exits before touching anything.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line did not parse, or asked for `--help`/`--version`:
    /// clap renders it and knows whether it goes to stdout (exit 0) or
    /// stderr (exit 2).
    #[error("{0}")]
    Cli(#[from] clap::Error),
    /// A combination of settings that is refused (e.g. a public metrics address
    /// without `metrics_listen_public`).
    #[error("{0}")]
    Usage(String),
    /// The config file could not be read or parsed.
    #[error("config file {path}: {detail}")]
    File {
        /// The file named by `--config`, or the default one.
        path: PathBuf,
        /// The read error, or the parser's message.
        detail: String,
    },
}

/// The command line. Every option is optional so that a flag that is not
/// given leaves the config file's value alone; the defaults shown in
/// `--help` are the built-in ones, applied in [`Config::defaults`].
#[derive(Debug, Parser)]
#[command(
    name = "vfiod",
    args_override_self = true,
    version,
    about = "PCI passthrough host agent",
    long_about = "PCI passthrough host agent\n\n\
        Keeps a registry of PCI devices set aside for passthrough, moves them \
        between their native driver and vfio-pci on request, and serves an \
        HTTP+JSON API on a Unix socket (see vfioctl(1) for the client).\n\n\
        Options override the config file.",
    after_help = "Under systemd it takes the socket from vfiod.socket, notifies readiness \
        (Type=notify), pings the watchdog and logs to the journal."
)]
pub struct Flags {
    /// Config file [default: /etc/vfiod/config.toml; missing is fine]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Unix socket to serve on
    /// [root: /run/vfiod/vfiod.sock; others: $XDG_RUNTIME_DIR/vfiod/vfiod.sock]
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub socket: Option<PathBuf>,
    /// Where the registry lives [root: /var/lib/vfiod; others: $XDG_STATE_HOME/vfiod]
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub state_dir: Option<PathBuf>,
    /// Sysfs root [default: /sys]; tests point it at a fake tree
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub sysfs: Option<PathBuf>,
    /// Devfs root [default: /dev]
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub devfs: Option<PathBuf>,
    /// Procfs root [default: /proc]; tests point it at a fake tree
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub proc: Option<PathBuf>,
    /// Group whose members may change things [default: vfiod]
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Limit for one sysfs write or driver settle, 10..=600000 [default: 5000]
    #[arg(long, value_name = "N", value_parser = parse_op_timeout_ms)]
    pub op_timeout_ms: Option<u64>,
    /// Run modprobe vfio-pci when a bind needs it
    #[arg(long)]
    pub load_modules: bool,
    /// Where to keep the boot-time udev rule ('' disables)
    /// [default: /etc/udev/rules.d as root; disabled otherwise]
    // A String, not a PathBuf: clap refuses an empty path, and '' is meaningful.
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub udev_rules_dir: Option<String>,
    /// Take back a vfio device another actor moves away
    #[arg(long)]
    pub reclaim: bool,
    /// Reset a device after detach and before giving it back to its driver
    /// [default: auto]
    #[arg(long, value_name = "WHEN", value_parser = ["auto", "never"])]
    pub reset_on_release: Option<String>,
    /// Consecutive failed resets that quarantine a device, 1..=1000 [default: 3]
    #[arg(long, value_name = "N", value_parser = parse_quarantine_after)]
    pub quarantine_after: Option<u32>,
    /// Give a device back to its driver when its VMM exits [default: it stays
    /// on vfio for the next VM]
    #[arg(long)]
    pub unbind_on_vmm_exit: bool,
    /// Where modules.alias names vfio variant drivers [default: /lib/modules/$(uname -r)]
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub modules_dir: Option<PathBuf>,
    /// Log level [default: info]
    #[arg(long, value_name = "LEVEL", value_parser = LOG_LEVELS)]
    pub log_level: Option<String>,
    /// Connections one unprivileged uid may hold [default: 64]
    #[arg(long, value_name = "N")]
    pub max_connections_per_uid: Option<usize>,
    /// GET /events streams one unprivileged uid may hold [default: 16]
    #[arg(long, value_name = "N")]
    pub max_event_streams_per_uid: Option<usize>,
    /// Connections all unprivileged uids together may hold [default: 1024; less
    /// if the fd limit leaves no room]
    #[arg(long, value_name = "N")]
    pub max_unprivileged_connections: Option<usize>,
    /// Time to send a request head, and to idle between requests, 100..=600000
    /// [default: 10000]
    #[arg(long, value_name = "N", value_parser = parse_header_timeout_ms)]
    pub header_timeout_ms: Option<u64>,
    /// Read uevents from a FIFO instead of netlink (tests)
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub uevent_fifo: Option<PathBuf>,
    /// Also serve GET /metrics (only) on this TCP address [default: off]
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow --metrics-listen on a non-loopback address
    #[arg(long)]
    pub metrics_listen_public: bool,
}

const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

fn parse_quarantine_after(v: &str) -> Result<u32, String> {
    quarantine_after(v.parse().map_err(|_| format!("not a number: {v:?}"))?)
}

fn parse_header_timeout_ms(v: &str) -> Result<u64, String> {
    let ms = v.parse().map_err(|_| format!("not a number: {v:?}"))?;
    header_timeout_from_ms(ms)?;
    Ok(ms)
}

fn parse_op_timeout_ms(v: &str) -> Result<u64, String> {
    let ms = v.parse().map_err(|_| format!("not a number: {v:?}"))?;
    timeout_from_ms(ms)?;
    Ok(ms)
}

fn xdg_dir(var: &str, fallback_under_home: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(fallback_under_home)))
        .unwrap_or_else(std::env::temp_dir)
}

impl Config {
    /// The built-in settings; root gets the system paths, others per-user ones
    /// and no udev rule.
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
            metrics_listen: None,
            metrics_listen_public: false,
        }
    }

    fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let file_err = |detail: String| ConfigError::File {
            path: path.to_owned(),
            detail,
        };
        let f: FileConfig =
            toml::from_str(text).map_err(|e| file_err(e.to_string().trim().to_owned()))?;
        self.apply(f).map_err(file_err)
    }

    /// Applies the settings `o` has over what is set: the file's over the
    /// defaults, then the command line's over both.
    fn apply(&mut self, o: FileConfig) -> Result<(), String> {
        if let Some(v) = o.socket {
            self.socket = v;
        }
        if let Some(v) = o.state_dir {
            self.state_dir = v;
        }
        if let Some(v) = o.sysfs {
            self.sysfs = v;
        }
        if let Some(v) = o.devfs {
            self.devfs = v;
        }
        if let Some(v) = o.proc {
            self.proc = v;
        }
        if let Some(v) = o.group {
            self.group = v;
        }
        if let Some(v) = o.op_timeout_ms {
            self.op_timeout = timeout_from_ms(v)?;
        }
        if let Some(v) = o.load_modules {
            self.load_modules = v;
        }
        if let Some(v) = o.udev_rules_dir {
            self.udev_rules_dir = (!v.as_os_str().is_empty()).then_some(v);
        }
        if let Some(v) = o.log_level {
            self.log_level = v;
        }
        if let Some(v) = o.reclaim {
            self.reclaim = v;
        }
        if let Some(v) = o.modules_dir {
            self.modules_dir = v;
        }
        if let Some(v) = o.reset_on_release {
            self.reset_on_release = reset_on_release(&v)?;
        }
        if let Some(v) = o.quarantine_after {
            self.quarantine_after = quarantine_after(v)?;
        }
        if let Some(v) = o.unbind_on_vmm_exit {
            self.unbind_on_vmm_exit = v;
        }
        if let Some(v) = o.max_connections_per_uid {
            self.limits.connections_per_uid = v;
        }
        if let Some(v) = o.max_event_streams_per_uid {
            self.limits.event_streams_per_uid = v;
        }
        if let Some(v) = o.max_unprivileged_connections {
            self.limits.unprivileged_connections = v;
        }
        if let Some(v) = o.header_timeout_ms {
            self.header_timeout = header_timeout_from_ms(v)?;
        }
        if let Some(v) = o.metrics_listen {
            self.metrics_listen = Some(v);
        }
        if let Some(v) = o.metrics_listen_public {
            self.metrics_listen_public = v;
        }
        Ok(())
    }

    /// Parses `args` (without the program name), reading the config file
    /// they name or the default one. `--help` and `--version` come back as
    /// a [`ConfigError::Cli`] that is not an error (`use_stderr()` false).
    pub fn from_args(args: &[String], is_root: bool) -> Result<Config, ConfigError> {
        let flags =
            Flags::try_parse_from(std::iter::once("vfiod").chain(args.iter().map(String::as_str)))?;
        Config::from_flags(flags, is_root)
    }

    /// Defaults, overlaid with the config file (if any) and then `flags`, and
    /// checked.
    pub fn from_flags(flags: Flags, is_root: bool) -> Result<Config, ConfigError> {
        let mut config = Config::defaults(is_root);
        let (path, must_exist) = match flags.config.clone() {
            Some(p) => (p, true),
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
        if let Some(v) = flags.uevent_fifo.clone() {
            config.uevent_fifo = Some(v);
        }
        config.apply(flags.into()).map_err(ConfigError::Usage)?;
        if let Some(addr) = config.metrics_listen {
            // The metrics name every registered device and its state:
            // other hosts see them only when the operator says so.
            if !addr.ip().is_loopback() && !config.metrics_listen_public {
                return Err(ConfigError::Usage(format!(
                    "metrics_listen {addr} is not a loopback address; set metrics_listen_public = true (or --metrics-listen-public) to serve metrics to other hosts"
                )));
            }
        }
        // The flag is checked by clap; the file's value is checked here.
        if !LOG_LEVELS.contains(&config.log_level.as_str()) {
            return Err(ConfigError::Usage(format!(
                "log level {:?} is not one of error, warn, info, debug, trace",
                config.log_level
            )));
        }
        config.limits.validate().map_err(ConfigError::Usage)?;
        Ok(config)
    }
}

fn running_kernel_modules() -> PathBuf {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    PathBuf::from("/lib/modules").join(release)
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

fn header_timeout_from_ms(ms: u64) -> Result<Duration, String> {
    if (100..=600_000).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err(format!("header_timeout_ms {ms} is outside 100..=600000"))
    }
}

fn timeout_from_ms(ms: u64) -> Result<Duration, String> {
    if (10..=600_000).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err(format!("op_timeout_ms {ms} is outside 10..=600000"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn run(a: &[&str]) -> Result<Config, ConfigError> {
        Config::from_args(&args(a), true)
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
        let usage_error = |a: &[&str], what: &str| match run(a) {
            Err(ConfigError::Cli(e)) => {
                assert!(e.use_stderr(), "{a:?} is an error, not --help");
                assert_eq!(e.exit_code(), 2, "{a:?}");
                let text = e.to_string();
                assert!(text.contains(what), "{a:?}: {text}");
            }
            other => panic!("{a:?}: {other:?}"),
        };
        usage_error(&["--bogus"], "--bogus");
        usage_error(&["--socket"], "--socket");
        usage_error(&["--op-timeout-ms", "abc"], "not a number");
        usage_error(&["--op-timeout-ms", "0"], "outside 10..=600000");
        usage_error(&["--log-level", "loud"], "loud");
        assert!(matches!(
            run(&["--config", "/nonexistent/x.toml"]),
            Err(ConfigError::File { .. })
        ));
        assert_eq!(
            run(&["--sysfs=/tmp/s"]).unwrap().sysfs,
            PathBuf::from("/tmp/s")
        );
        assert_eq!(run(&["--udev-rules-dir", ""]).unwrap().udev_rules_dir, None);
        match run(&["--help"]) {
            Err(ConfigError::Cli(e)) => {
                assert!(!e.use_stderr());
                assert!(e.to_string().contains("--op-timeout-ms"));
            }
            other => panic!("{other:?}"),
        }
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
            Err(ConfigError::Cli(e)) if e.to_string().contains("outside 100..=600000")
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_listener_stays_on_loopback_unless_made_public() {
        assert_eq!(run(&[]).unwrap().metrics_listen, None);
        let c = run(&["--metrics-listen", "127.0.0.1:9847"]).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9847".parse().unwrap()));
        assert!(run(&["--metrics-listen", "[::1]:9847"]).is_ok());
        let err = run(&["--metrics-listen", "0.0.0.0:9847"]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Usage(m) if m.contains("metrics_listen_public")),
            "{err}"
        );
        assert!(run(&[
            "--metrics-listen",
            "0.0.0.0:9847",
            "--metrics-listen-public"
        ])
        .is_ok());
        assert!(matches!(
            run(&["--metrics-listen", "localhost"]),
            Err(ConfigError::Cli(_))
        ));
    }

    #[test]
    fn non_root_defaults_live_under_xdg_dirs() {
        let c = Config::defaults(false);
        assert!(!c.socket.starts_with("/run/vfiod"));
        assert!(!c.state_dir.starts_with("/var/lib"));
        assert!(c.udev_rules_dir.is_none());
    }
}
