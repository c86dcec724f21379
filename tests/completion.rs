//! Shell completion: bash, fish and zsh complete the device names of the
//! running vfiod on a fake tree, and every script vfioctl writes is valid
//! shell.

#[path = "vfioctl_stand_in/mod.rs"]
mod vfioctl_stand_in;

use std::process::Command;

use common::fakesys::TempDir;
use common::host::standard_daemon;
use common::run;
use common::standard::{AMD, GPU, NIC};

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
    assert!(complete(&["sri"]).contains(&"sriov".to_owned()));
    assert_eq!(
        complete(&["sriov", "gpu0", "4", "--vf-driver", ""]),
        ["vfio-pci", "none", "native"]
    );
    // register offers the candidates that are not registered yet.
    let register = complete(&["register", ""]);
    assert!(register.contains(&AMD.to_owned()), "{register:?}");
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
        let nic_id = d.get("/devices/nic0").json()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let fish = |line: &str| -> Vec<String> {
            let out = Command::new("fish")
                .args([
                    "--no-config",
                    "-c",
                    &format!(
                        "source '{}'; complete -C'vfioctl --socket {socket} {line}'",
                        fish_file.display()
                    ),
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.starts_with('-'))
                .map(str::to_owned)
                .collect()
        };
        // The help column: a name's address and id, an id's address and
        // name, a candidate's vendor and device names.
        let mut shown = fish("show ");
        shown.sort();
        assert_eq!(
            shown,
            [format!("gpu0\t{GPU} {id}"), format!("nic0\t{NIC} {nic_id}")]
        );
        assert_eq!(
            fish(&format!("show {}", &id[..3])),
            [format!("{id}\t{GPU} gpu0")]
        );
        assert_eq!(
            fish("register 0000:00:0"),
            [
                "0000:00:04.0\tNVIDIA Corporation TU104GL [Tesla T4]",
                "0000:00:05.0\tAdvanced Micro Devices, Inc. [AMD/ATI] Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]"
            ]
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

/// `sriov` offers the devices that can have VFs: every registered device
/// but the VFs themselves.
#[test]
fn sriov_completes_pfs_and_not_their_vfs() {
    let device = |name: &str, address: &str, parent: Option<&str>| {
        let mut d = serde_json::json!({
            "id": format!("{name}-id"), "name": name, "type": "pci", "pci_address": address,
            "vendor_id": "8086", "device_id": "10c9", "iommu_group": 7, "bound_to_vfio": false,
            "attached_to": null, "created_at": "2026-12-07T04:00:00Z", "tags": {},
            "present": true, "current_driver": "igb", "original_driver": null,
            "bound_by_vfiod": false, "vendor_name": null, "device_name": null,
            "class": "020000", "subsystem_vendor_id": "8086", "subsystem_device_id": "a03c",
            "stuck": false, "identity_mismatch": false, "attached_uid": null,
            "attached_pid": null, "health": "ok", "health_reason": null, "last_reset": null,
            "reset_method": null
        });
        if let Some(p) = parent {
            d["parent"] = serde_json::json!(p);
            d["vf_index"] = serde_json::json!(0);
        }
        d
    };
    let list = serde_json::json!([
        device("nic0", NIC, None),
        device("nic0-vf0", "0000:00:10.0", Some("nic0-id")),
    ])
    .to_string();
    let dir = TempDir::new("vfioctl-completion").unwrap();
    let script = dir.path().join("vfioctl.bash");
    let (_, text, _) = run(
        common::vfioctl_bin(),
        &["completion", "bash", "--completer", common::vfioctl_bin()],
    );
    std::fs::write(&script, text).unwrap();
    let offered = |command: &str| -> Vec<String> {
        let server = vfioctl_stand_in::StandIn::start(&[("200 OK", &list)]);
        let program = format!(
            "source '{}'; COMP_WORDS=(vfioctl --socket '{}' {command} ''); COMP_CWORD=4; \
             COMP_TYPE=9; _clap_complete_vfioctl vfioctl '' {command}; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            server.socket.display()
        );
        let out = Command::new("bash")
            .args(["--norc", "-c", &program])
            .output()
            .unwrap();
        let seen = server.finish();
        assert_eq!(seen.len(), 1, "{command}: one list request");
        let mut words: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty() && !l.starts_with('-'))
            .collect();
        words.sort();
        words
    };
    assert_eq!(offered("sriov"), ["nic0"]);
    assert_eq!(
        offered("show"),
        ["nic0", "nic0-vf0"],
        "other commands take VFs"
    );
}

/// `claim` and `capacity` complete `--tag` with the tags the registered
/// devices carry, `claim --vgpu-type` with the types free VFs can take
/// now, and `vgpu-types` with the devices that can have VFs.
#[test]
fn claim_completes_tags_and_vgpu_types_from_the_agent() {
    let device = |name: &str, tags: serde_json::Value, parent: Option<&str>| {
        let mut d = serde_json::json!({
            "id": format!("{name}-id"), "name": name, "type": "gpu", "pci_address": GPU,
            "vendor_id": "10de", "device_id": "26b9", "iommu_group": 7, "bound_to_vfio": false,
            "attached_to": null, "created_at": "2026-12-07T04:00:00Z", "tags": tags,
            "present": true, "current_driver": "nvidia", "original_driver": null,
            "bound_by_vfiod": false, "vendor_name": null, "device_name": null,
            "class": "030200", "subsystem_vendor_id": "10de", "subsystem_device_id": "1234",
            "stuck": false, "identity_mismatch": false, "attached_uid": null,
            "attached_pid": null, "health": "ok", "health_reason": null, "last_reset": null,
            "reset_method": null
        });
        if let Some(p) = parent {
            d["parent"] = serde_json::json!(p);
            d["vf_index"] = serde_json::json!(0);
        }
        d
    };
    let list = serde_json::json!([
        device("l40s", serde_json::json!({"resource": "vgpu"}), None),
        device(
            "l40s-vf0",
            serde_json::json!({"resource": "vgpu", "site": "a"}),
            Some("l40s-id")
        ),
        device("nic0", serde_json::json!({"resource": "nic"}), None),
    ])
    .to_string();
    let capacity = serde_json::json!({"resources": [
        {"resource": "nic", "total": 1, "free": 1, "attached": 0, "quarantined": 0, "needs_reset": 0},
        {"resource": "vgpu", "total": 2, "free": 2, "attached": 0, "quarantined": 0,
         "needs_reset": 0, "vgpu_types": {"NVIDIA L40S-12Q": 2, "NVIDIA L40S-48Q": 1}}
    ]})
    .to_string();
    let dir = TempDir::new("vfioctl-completion").unwrap();
    let script = dir.path().join("vfioctl.bash");
    let (_, text, _) = run(
        common::vfioctl_bin(),
        &["completion", "bash", "--completer", common::vfioctl_bin()],
    );
    std::fs::write(&script, text).unwrap();
    // The words after `vfioctl --socket S`, the last one under the cursor;
    // what the agent is asked, and what is offered.
    let offered = |words: &[&str], answer: &str| -> (Vec<String>, Vec<String>) {
        let server = vfioctl_stand_in::StandIn::start(&[("200 OK", answer)]);
        let socket = server.socket.display().to_string();
        let mut line = vec!["vfioctl", "--socket", &socket];
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
        let paths = server.finish().into_iter().map(|s| s.path).collect();
        let words = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        (paths, words)
    };
    let (asked, tags) = offered(&["claim", "--tag", ""], &list);
    assert_eq!(asked, ["/devices"]);
    assert_eq!(tags, ["resource=nic", "resource=vgpu", "site=a"]);
    let (_, tags) = offered(&["capacity", "--tag", "res"], &list);
    assert_eq!(tags, ["resource=nic", "resource=vgpu"]);
    let (asked, types) = offered(
        &["claim", "--tag", "resource=vgpu", "--vgpu-type", ""],
        &capacity,
    );
    assert_eq!(asked, ["/devices/capacity"]);
    assert_eq!(types, ["NVIDIA L40S-12Q", "NVIDIA L40S-48Q"]);
    let (_, words) = offered(&["vgpu-types", ""], &list);
    let pfs: Vec<&String> = words.iter().filter(|w| !w.starts_with('-')).collect();
    assert_eq!(pfs, ["l40s", "nic0"], "no VF");
    let (_, options) = offered(&["claim", "--numa-"], "[]");
    assert_eq!(options, ["--numa-required"]);
    let (_, commands) = offered(&["vg"], "[]");
    assert_eq!(commands, ["vgpu-types"]);
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
    let (_, text, _) = run(common::vfioctl_bin(), &["completion", "bash", "--static"]);
    assert!(
        text.contains("sriov") && text.contains("vfio-pci none native"),
        "the static script knows sriov and its --vf-driver values"
    );
    for word in [
        "claim",
        "--numa-required",
        "--vgpu-type",
        "--instance",
        "capacity",
        "vgpu-types",
    ] {
        assert!(text.contains(word), "the static script knows {word}");
    }
    let (_, text, _) = run(common::vfioctl_bin(), &["completion", "zsh"]);
    assert!(text.starts_with("#compdef vfioctl"), "{text}");
    assert!(text.contains("VFIOCTL_COMPLETE=\"zsh\""), "{text}");
}
