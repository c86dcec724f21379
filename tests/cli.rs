//! The command lines of both binaries: the man pages list what `--help`
//! shows, exit codes, the requests vfioctl's commands send (against a
//! stand-in server that records them), and shell completion of device
//! names from a running vfiod on a fake tree.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;

use common::fakeproc::{alias_node, dev_numbers};
use common::fakesys::{DeviceSpec, FakeSys, TempDir};
use common::host::{standard_daemon, Host};
use common::simkernel::SimKernel;
use common::standard::{AMD, GPU, NIC};
use common::{vfioctl, Daemon};
use serde_json::{json, Value};

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .env_remove("VFIOD_SOCKET")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The long options a `--help` text lists (`-h, --help` included).
fn help_options(help: &str) -> BTreeSet<String> {
    help.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix('-')
                .filter(|r| !r.starts_with('-'))
                .map_or(l, |r| r.get(3..).unwrap_or(""));
            let opt = l.strip_prefix("--")?;
            let name: String = opt
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty()).then(|| format!("--{name}"))
        })
        .collect()
}

/// The `\-\-option` names in roff text.
fn roff_options(text: &str) -> BTreeSet<String> {
    let plain = text.replace("\\-", "-");
    let mut out = BTreeSet::new();
    let mut rest = plain.as_str();
    while let Some(i) = rest.find("--") {
        let name: String = rest[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if !name.is_empty() {
            out.insert(format!("--{name}"));
        }
        rest = &rest[i + 2..];
    }
    out
}

/// The `.TP` entries of a man page section: their tag lines (the macro
/// lines right after `.TP`, before the prose starts).
fn section_entries(page: &str, section: &str) -> Vec<String> {
    let body = page
        .split("\n.SH ")
        .find(|s| s.starts_with(section))
        .unwrap_or_else(|| panic!("no section {section}"));
    body.split("\n.TP\n")
        .skip(1)
        .map(|entry| {
            entry
                .lines()
                .take_while(|l| l.starts_with('.') && !l.starts_with(".PP"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

fn man_page(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("man").join(name)).unwrap()
}

#[test]
fn vfiod_man_page_lists_the_options_help_shows() {
    let (code, help, _) = run(common::vfiod_bin(), &["--help"]);
    assert_eq!(code, 0);
    let man: BTreeSet<String> = section_entries(&man_page("vfiod.8"), "OPTIONS")
        .iter()
        .flat_map(|e| roff_options(e))
        .collect();
    assert_eq!(man, help_options(&help), "vfiod.8 OPTIONS vs vfiod --help");
}

#[test]
fn vfioctl_man_page_lists_the_commands_and_options_help_shows() {
    let page = man_page("vfioctl.1");
    let (code, help, _) = run(common::vfioctl_bin(), &["--help"]);
    assert_eq!(code, 0);
    let global: BTreeSet<String> = section_entries(&page, "OPTIONS")
        .iter()
        .flat_map(|e| roff_options(e))
        .collect();
    assert_eq!(global, help_options(&help), "vfioctl.1 OPTIONS vs --help");

    let commands: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 15, "{commands:?}");
    let entries = section_entries(&page, "COMMANDS");
    let man_commands: Vec<String> = entries
        .iter()
        .filter_map(|e| {
            let first = e.lines().next()?;
            let word = first.split_whitespace().nth(1)?;
            Some(word.trim_matches('"').to_owned())
        })
        .collect();
    assert_eq!(
        man_commands.iter().collect::<BTreeSet<_>>(),
        commands.iter().collect::<BTreeSet<_>>(),
        "vfioctl.1 COMMANDS vs --help"
    );
    for (command, entry) in man_commands.iter().zip(&entries) {
        let (code, sub_help, err) = run(common::vfioctl_bin(), &[command, "--help"]);
        assert_eq!(code, 0, "{command}: {err}");
        let mut options = help_options(&sub_help);
        for g in &global {
            options.remove(g);
        }
        assert_eq!(
            roff_options(entry),
            options,
            "vfioctl.1 entry of {command} vs vfioctl {command} --help"
        );
    }
}

#[test]
fn exit_codes_are_the_ones_before_clap() {
    let ctl = common::vfioctl_bin();
    let (code, out, _) = run(ctl, &[]);
    assert_eq!(code, 0, "no command prints the help");
    assert!(out.contains("Usage: vfioctl"), "{out}");
    let (code, _, err) = run(ctl, &["--socket"]);
    assert_eq!(code, 2, "a broken global option: {err}");
    let (code, _, err) = run(ctl, &["frobnicate"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("frobnicate"), "{err}");
    let (code, _, err) = run(ctl, &["show"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ID|NAME"), "{err}");
    let (code, _, err) = run(ctl, &["reset", "gpu0", "--method", "warm"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("af_flr") && err.contains("device_specific"),
        "{err}"
    );
    let (code, _, err) = run(ctl, &["list", "--tag", "novalue"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("KEY=VALUE"), "{err}");
    let (code, out, _) = run(ctl, &["--version"]);
    assert_eq!((code, out.trim()), (0, "vfioctl 0.1.0"));

    let (code, out, _) = run(common::vfiod_bin(), &["--version"]);
    assert_eq!((code, out.trim()), (0, "vfiod 0.1.0"));
    let (code, _, err) = run(common::vfiod_bin(), &["--op-timeout-ms", "5"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("outside 10..=600000"), "{err}");
    let (code, _, err) = run(common::vfiod_bin(), &["--log-level", "loud"]);
    assert_eq!(code, 2, "{err}");
}

/// What a stand-in server saw of one request.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    body: Value,
}

/// Runs vfioctl against a socket that answers one request with `reply`,
/// and returns what vfioctl sent and printed.
fn against_stand_in(args: &[&str], reply: Value) -> (Seen, i32, String) {
    let dir = TempDir::new("vfioctl-stand-in").unwrap();
    let socket = dir.path().join("s.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream);
        let mut request_line = String::new();
        reader.read_line(&mut request_line).unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let reply = reply.to_string();
        write!(
            reader.get_mut(),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
            reply.len()
        )
        .unwrap();
        let mut parts = request_line.split_whitespace();
        Seen {
            method: parts.next().unwrap().to_owned(),
            path: parts.next().unwrap().to_owned(),
            body: if body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&body).unwrap()
            },
        }
    });
    let (code, out, err) = vfioctl(&socket, args);
    let seen = server.join().unwrap();
    assert_eq!(code, 0, "{args:?}: {err}");
    (seen, code, out)
}

#[test]
fn new_commands_send_the_bodies_of_the_contract() {
    let device = json!({"id": "d1", "name": "gpu0", "pci_address": GPU});
    let (seen, _, _) = against_stand_in(&["bind", "gpu0", "--force"], device.clone());
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/devices/gpu0/bind")
    );
    assert_eq!(
        seen.body,
        json!({"with_group": false, "dry_run": false, "force": true})
    );
    let (seen, _, _) = against_stand_in(&["bind", "gpu0"], device.clone());
    assert_eq!(seen.body, json!({"with_group": false, "dry_run": false}));

    let (seen, _, out) = against_stand_in(
        &["attach", "gpu 0", "vm-7", "--uid", "64055", "--pid", "4242"],
        device.clone(),
    );
    assert_eq!(seen.path, "/devices/gpu%200/attach");
    assert_eq!(
        seen.body,
        json!({"instance_id": "vm-7", "uid": 64055, "pid": 4242})
    );
    assert!(out.contains("gpu0"), "{out}");

    let (seen, _, _) = against_stand_in(
        &["reset", "gpu0", "--method", "af_flr", "--dry-run"],
        json!({"dry_run": true, "method": "af_flr", "scope": [GPU]}),
    );
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/devices/gpu0/reset")
    );
    assert_eq!(seen.body, json!({"method": "af_flr", "dry_run": true}));
    let (seen, _, _) = against_stand_in(&["reset", "gpu0"], device.clone());
    assert_eq!(
        seen.body,
        json!({"dry_run": false}),
        "no method: the agent's default"
    );

    let holders = json!({"holders": [
        {"kind": "process", "pci_address": GPU, "pid": 812, "comm": "Xorg", "uid": 0,
         "path": "/dev/dri/card0", "unit": "gdm.service"},
        {"kind": "mount", "pci_address": "0000:02:00.0", "device": "/dev/nvme0n1p2",
         "mount_point": "/", "fstype": "ext4"},
        {"kind": "net_interface", "pci_address": NIC, "interface": "eno1",
         "addresses": ["192.0.2.4/24"], "routes": 2},
        {"kind": "framebuffer_console", "pci_address": GPU, "vtconsole": "vtcon1",
         "framebuffer": "fb0"},
    ]});
    let (seen, _, out) = against_stand_in(&["holders", "gpu0"], holders);
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/devices/gpu0/holders")
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("FUNCTION") && lines[0].contains("HOLDER"),
        "{out}"
    );
    assert!(
        lines[1].contains(GPU)
            && lines[1].contains("pid 812 (Xorg)")
            && lines[1].contains("gdm.service"),
        "{out}"
    );
    assert!(
        lines[2].contains("/dev/nvme0n1p2 mounted on / (ext4)"),
        "{out}"
    );
    assert!(
        lines[3].contains("eno1 addresses: 192.0.2.4/24; routes: 2"),
        "{out}"
    );
    assert!(
        lines[4].contains("vtcon1") && lines[4].contains("fb0"),
        "{out}"
    );
    let (_, _, out) = against_stand_in(&["holders", "gpu0"], json!({"holders": []}));
    assert_eq!(out, "nothing holds gpu0\n");
}

#[test]
fn available_all_lists_every_function_like_lspci() {
    let (_fs, d) = standard_daemon();
    d.register(GPU, "gpu0");
    let (code, out, err) = vfioctl(&d.socket, &["available", "--all"]);
    assert_eq!(code, 0, "{err}");
    let all = FakeSys::standard_devices();
    assert_eq!(out.lines().count(), all.len() + 1, "{out}");
    let nic = out.lines().find(|l| l.starts_with(NIC)).expect(NIC);
    assert!(
        nic.contains("[0200]") && nic.contains("[8086:10d3]") && nic.contains("e1000e"),
        "{nic}"
    );
    let bridge = out.lines().find(|l| l.starts_with("0000:00:01.0")).unwrap();
    assert!(
        bridge.contains("pcieport") && bridge.contains("[0604]"),
        "{bridge}"
    );
    let gpu = out.lines().find(|l| l.starts_with(GPU)).unwrap();
    let id = d.get("/devices/gpu0").json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(gpu.contains(&id) && gpu.contains("nvidia"), "{gpu}");
    let (_, out, _) = vfioctl(&d.socket, &["available"]);
    assert!(!out.contains(NIC), "without --all only candidates: {out}");
    let r = d.get("/devices/available?all=maybe");
    r.expect_error(400, "invalid_request");
}

#[test]
fn completion_offers_the_registered_devices_of_the_running_agent() {
    let (_fs, d) = standard_daemon();
    let id = d.register(GPU, "gpu0")["id"].as_str().unwrap().to_owned();
    d.register(NIC, "nic0");
    let dir = TempDir::new("vfioctl-completion").unwrap();
    let script = dir.path().join("vfioctl.bash");
    let (code, text, err) = run(
        common::vfioctl_bin(),
        &["completion", "bash", "--completer", common::vfioctl_bin()],
    );
    assert_eq!(code, 0, "{err}");
    std::fs::write(&script, text).unwrap();
    let socket = d.socket.to_str().unwrap();
    // Bash calls the completion function with the command, the word under
    // the cursor and the one before; COMP_WORDS/COMP_CWORD hold the line.
    let complete = |words: &[&str]| -> Vec<String> {
        let mut line = vec!["vfioctl", "--socket", socket];
        line.extend_from_slice(words);
        let cword = line.len() - 1;
        let quoted: Vec<String> = line.iter().map(|w| format!("'{w}'")).collect();
        let program = format!(
            "source '{}'; COMP_WORDS=({}); COMP_CWORD={cword}; COMP_TYPE=9; \
             _clap_complete_vfioctl vfioctl '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            quoted.join(" "),
            line[cword],
            line[cword - 1]
        );
        let out = Command::new("bash")
            .args(["--norc", "-c", &program])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect()
    };
    let mut names: Vec<String> = complete(&["show", ""])
        .into_iter()
        .filter(|w| !w.starts_with('-'))
        .collect();
    names.sort();
    assert_eq!(names, ["gpu0", "nic0"], "names, and the ids stay hidden");
    assert_eq!(complete(&["bind", "g"]), ["gpu0"]);
    assert_eq!(
        complete(&["unbind", &id[..3]]),
        std::slice::from_ref(&id),
        "an id completes when no name matches"
    );
    assert!(complete(&["res"]).contains(&"reset".to_owned()));
    assert!(complete(&["bind", "gpu0", "--f"]).contains(&"--force".to_owned()));
    // register offers the candidates that are not registered yet.
    let register = complete(&["register", ""]);
    assert!(
        register.contains(&"0000:00:05.0".to_owned()),
        "{register:?}"
    );
    assert!(!register.contains(&GPU.to_owned()), "{register:?}");
    // No agent: no device names, and no error under the cursor.
    let gone = dir.path().join("none.sock");
    let program = format!(
        "source '{}'; COMP_WORDS=(vfioctl --socket '{}' show ''); COMP_CWORD=4; \
         _clap_complete_vfioctl vfioctl '' show; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        gone.display()
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &program])
        .output()
        .unwrap();
    let offered = String::from_utf8_lossy(&out.stdout);
    assert!(
        offered.lines().all(|w| w.trim().starts_with('-')),
        "options only: {offered}"
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // fish runs the same request through its own registration.
    if Command::new("fish").arg("--version").output().is_ok() {
        let (_, fish_script, _) = run(
            common::vfioctl_bin(),
            &["completion", "fish", "--completer", common::vfioctl_bin()],
        );
        let fish_file = dir.path().join("vfioctl.fish");
        std::fs::write(&fish_file, fish_script).unwrap();
        let out = Command::new("fish")
            .args([
                "--no-config",
                "-c",
                &format!(
                    "source '{}'; complete -C'vfioctl --socket {socket} show '",
                    fish_file.display()
                ),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let names: Vec<&str> = text.lines().filter_map(|l| l.split('\t').next()).collect();
        assert!(names.contains(&"gpu0") && names.contains(&"nic0"), "{text}");
        assert!(
            text.contains(GPU),
            "the help column shows the address: {text}"
        );
    } else {
        eprintln!("fish not installed: its completion was not run");
    }

    // zsh: the completer function of its registration, run with compsys's
    // `_describe` replaced by one that prints the candidates it is given.
    if Command::new("zsh").arg("--version").output().is_ok() {
        let (_, zsh_script, _) = run(
            common::vfioctl_bin(),
            &["completion", "zsh", "--completer", common::vfioctl_bin()],
        );
        let zsh_file = dir.path().join("_vfioctl");
        std::fs::write(&zsh_file, zsh_script).unwrap();
        let program = format!(
            "compdef() {{ : }}; _describe() {{ local a=${{@[-1]}}; print -rl -- \"${{(@P)a}}\" }}; \
             source '{}'; words=(vfioctl --socket '{socket}' show ''); CURRENT=5; \
             _clap_dynamic_completer_vfioctl",
            zsh_file.display()
        );
        let out = Command::new("zsh")
            .args(["-f", "-c", &program])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let names: Vec<&str> = text.lines().filter_map(|l| l.split(':').next()).collect();
        assert!(
            names.contains(&"gpu0") && names.contains(&"nic0"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("zsh not installed: its completion was not run");
    }
}

#[test]
fn static_and_zsh_scripts_are_valid_shell() {
    for (shell, check) in [("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")] {
        for mode in [
            &["completion", shell][..],
            &["completion", shell, "--static"][..],
        ] {
            let (code, text, err) = run(common::vfioctl_bin(), mode);
            assert_eq!(code, 0, "{mode:?}: {err}");
            assert!(text.contains("vfioctl"), "{mode:?}");
            if Command::new(check).arg("--version").output().is_err() {
                eprintln!("{check} not installed: {mode:?} not syntax-checked");
                continue;
            }
            let dir = TempDir::new("vfioctl-script").unwrap();
            let file = dir.path().join("script");
            std::fs::write(&file, &text).unwrap();
            let out = Command::new(check).arg("-n").arg(&file).output().unwrap();
            assert!(
                out.status.success(),
                "{mode:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let (_, text, _) = run(common::vfioctl_bin(), &["completion", "zsh"]);
    assert!(text.starts_with("#compdef vfioctl"), "{text}");
    assert!(text.contains("VFIOCTL_COMPLETE=\"zsh\""), "{text}");
}

#[test]
fn holders_of_a_busy_gpu_through_vfioctl() {
    let h = Host::builder().fake_proc().start();
    let (fs, proc, d) = (&h.fs, h.proc(), &h.d);
    d.register(AMD, "amd");
    let (_, out, _) = vfioctl(&d.socket, &["holders", "amd"]);
    assert_eq!(out, "nothing holds amd\n");
    // An X server has the GPU's DRM node open.
    fs.add_class_device(AMD, "drm/card0", "drm", Some(&dev_numbers("/dev/full")));
    let node = fs.dev_path("dri/card0");
    alias_node(&node, "/dev/full");
    let mut p = proc.process(2001, "Xorg");
    p.uid(1000)
        .cgroup("0::/system.slice/display-manager.service\n");
    p.fd(&node);
    let (code, out, err) = vfioctl(&d.socket, &["holders", "amd"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[1].starts_with(AMD)
            && lines[1].contains("process")
            && lines[1].contains("pid 2001 (Xorg) uid 1000 has ")
            && lines[1].ends_with("dri/card0 open, unit display-manager.service"),
        "{out}"
    );
    let (code, _, err) = vfioctl(&d.socket, &["bind", "amd"]);
    assert_eq!(code, 1);
    assert!(err.contains("device_busy") && err.contains("Xorg"), "{err}");
}

#[test]
fn reset_through_vfioctl() {
    let fs = FakeSys::new();
    fs.load_vfio();
    fs.add_device(
        DeviceSpec::new(NIC, 0x8086, 0x10d3, 0x020000)
            .driver("e1000e")
            .group(2)
            .reset_methods("flr pm"),
    );
    let _sim = SimKernel::start(&fs);
    let d = Daemon::start(&fs, &[]);
    d.register(NIC, "nic");
    let (code, out, err) = vfioctl(&d.socket, &["reset", "nic", "--method", "pm", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("dry run, nothing changed; a reset would try pm and reach:\n  {NIC} (e1000e)\n")
    );
    let (code, out, err) = vfioctl(&d.socket, &["reset", "nic", "--method", "pm"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(NIC) && out.contains("health:") && out.contains("ok"),
        "{out}"
    );
    let last = &d.get("/devices/nic").json()["last_reset"];
    assert_eq!(last["method"], "pm", "{last}");
    let (code, _, err) = vfioctl(&d.socket, &["reset", "nic", "--method", "bus"]);
    assert_eq!(code, 1, "no bus reset offered by the kernel: {err}");
}
