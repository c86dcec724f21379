//! The documented command lines: each man page lists exactly the commands
//! and options `--help` shows, and the exit codes are the documented ones.

use std::collections::BTreeSet;
use std::path::Path;

use common::run;

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
            // `vgpu\-types`: a command name is typed with an ASCII minus.
            Some(word.trim_matches('"').replace("\\-", "-"))
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
