//! Messages that lead the right way: one `pocketvisor: error:` line with a status scripts
//! can tell apart, help texts that list what exists, logs that honour --log-level.

mod common;

use std::process::{Command, Output};

fn pv(args: &[&str]) -> Output {
    Command::new(common::bin())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("POCKETVISOR_LOG")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_bad_flag_value_is_one_error_line_and_status_1() {
    let o = pv(&["run", "--kernel", "k.elf", "--memory", "lots"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("pocketvisor: error: invalid value 'lots' for '--memory"),
        "{err}"
    );
    // An unknown flag is still a usage error (status 2, with clap's usage text).
    let o = pv(&["run", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn a_missing_path_says_so_with_the_not_found_status() {
    let o = pv(&["restore", "/nonexistent/snapshot"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).trim_end(),
        "pocketvisor: error: cannot restore /nonexistent/snapshot: no such snapshot directory"
    );
}

#[test]
fn help_lists_every_profile_command_and_the_exit_statuses() {
    let top = String::from_utf8_lossy(&pv(&["--help"]).stdout).into_owned();
    assert!(
        top.contains("EXIT STATUS") && top.contains("3  not found"),
        "{top}"
    );
    let help = String::from_utf8_lossy(&pv(&["profile", "--help"]).stdout).into_owned();
    for cmd in [
        "create",
        "list",
        "show",
        "start",
        "stop",
        "suspend",
        "resume",
        "delete",
        "switch",
        "events",
        "audit",
        "status",
        "clipboard",
        "send-file",
        "set",
        "logs",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(cmd)),
            "{cmd} missing:\n{help}"
        );
    }
    let handset = String::from_utf8_lossy(&pv(&["handset", "--help"]).stdout).into_owned();
    assert!(!handset.contains("unjailed"), "{handset}");
}

/// Runs a handset daemon on a new state directory until it listens, stops it with SIGTERM,
/// and returns what it wrote on stderr.
fn daemon_stderr(tag: &str, extra: &[&str]) -> String {
    let scratch = common::Scratch::new("pv-messages", tag);
    let child = Command::new(common::bin())
        .args(["handset", "--no-jail", "--cgroup-parent"])
        .arg(format!("pv-messages-{}", std::process::id()))
        .arg("--state-dir")
        .arg(&scratch.0)
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("POCKETVISOR_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let sock = scratch.0.join("handset.sock");
    let t0 = std::time::Instant::now();
    while !sock.exists() && t0.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Past the socket's creation, the daemon logs before it serves: give it a moment.
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    stderr(&out)
}

#[test]
fn the_daemon_says_where_it_listens_without_colour_and_log_level_quiets_it() {
    let said = daemon_stderr("default", &[]);
    assert!(said.contains("listening on"), "{said}");
    assert!(said.contains("stopped; no longer listening on"), "{said}");
    assert!(
        !said.contains('\x1b'),
        "ANSI codes off a terminal: {said:?}"
    );
    let quiet = daemon_stderr("quiet", &["--log-level", "warn"]);
    assert!(!quiet.contains("listening on"), "{quiet}");
    // A filter that does not parse is a usage error.
    let o = pv(&["--log-level", "nonsense=[", "doctor"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).starts_with("pocketvisor: error: --log-level"));
}

#[test]
fn export_refuses_a_short_passphrase_before_touching_anything() {
    let t = common::Scratch::new("pv-messages", "short-passphrase");
    std::fs::write(t.path("handset.db"), b"").unwrap();
    let out = t.path("work.pvp");
    let state = t.0.to_str().unwrap();
    let o = Command::new(common::bin())
        .args([
            "export",
            "work",
            "-o",
            out.to_str().unwrap(),
            "--state-dir",
            state,
        ])
        .env("POCKETVISOR_PASSPHRASE", "hunter2")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).trim_end(),
        "pocketvisor: error: $POCKETVISOR_PASSPHRASE: the passphrase has 7 characters; a new \
         portable file needs at least 12 (a few words are easy to type and hard to guess)"
    );
    assert!(!out.exists(), "nothing is written");
}

/// `doctor` says whether it runs as root and whether the daemon could make its cgroups, and
/// leaves no group behind.
#[test]
fn doctor_checks_root_and_cgroup_write_access() {
    let o = pv(&["doctor"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} line: {text}"))
            .to_string()
    };
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    assert_eq!(line("root:").contains("yes"), root, "{text}");
    let cg = line("cgroups:");
    assert!(
        cg.contains("a group can be made") || cg.contains("none:"),
        "{cg}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&pv(&["doctor", "--json"]).stdout).unwrap();
    assert_eq!(json["root"], root);
    assert!(["v1", "v2", "none"].contains(&json["cgroups"]["mode"].as_str().unwrap()));
    let pid_groups = |dir: &str| {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("pocketvisor-doctor-")
            })
            .count()
    };
    for dir in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
    ] {
        assert_eq!(pid_groups(dir), 0, "a doctor group is left in {dir}");
    }
}
