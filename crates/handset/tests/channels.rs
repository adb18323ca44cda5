//! Cross-profile channels end to end: two probe guests in agent mode (`pv.mode=agent`), the
//! clipboard and a file copied personal -> work, refused work -> personal (403, CLI exit 1,
//! data unchanged), every attempt audited, and the decision following edits of the specs.
//! Needs /dev/kvm, the probe guest (guest/build-probe.sh) and `cargo build -p pocketvisor`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use agent_proto::b64;
use common::{can_run_vms, loud, wait_until, Daemon};
use handset::channels::{sha256_hex, Transfer};
use handset::{CreateProfile, ProfileSpec};
use serde_json::{json, Value};

/// One request to a guest agent, straight through the profile's vsock socket.
fn agent(d: &Daemon, profile: &str, req: Value) -> Value {
    let sock = d.dir.join(format!("profiles/{profile}/run/vsock.sock"));
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"CONNECT 1025\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "vsock handshake: {ok:?}");
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
}

fn clipboard(d: &Daemon, profile: &str) -> Vec<u8> {
    let a = agent(d, profile, json!({"op": "clipboard_get"}));
    assert_eq!(a["ok"], true, "{a}");
    b64::decode(a["data_b64"].as_str().unwrap()).unwrap()
}

fn set_clipboard(d: &Daemon, profile: &str, data: &[u8]) {
    let a = agent(
        d,
        profile,
        json!({"op": "clipboard_set", "mime": "text/plain", "data_b64": b64::encode(data)}),
    );
    assert_eq!(a, json!({"ok": true, "bytes": data.len()}));
}

fn create_agent_profile(d: &Daemon, name: &str, channels: &str) {
    create_agent_profile_with(d, name, "", channels);
}

/// An agent-mode probe profile with more top-level spec lines (`top`) and `[channels]`.
fn create_agent_profile_with(d: &Daemon, name: &str, top: &str, channels: &str) {
    let text = format!(
        "name = \"{name}\"\nkernel = \"probe\"\ncmdline = \"pv.mode=agent\"\nmemory_mib = 128\n\
         {top}\n[channels]\n{channels}\n"
    );
    let req = CreateProfile {
        spec: Some(ProfileSpec::from_toml(&text).unwrap()),
        ..Default::default()
    };
    let _: handset::ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
}

/// Rewrites a profile's spec file (the daemon reads it at each transfer).
fn edit_spec(d: &Daemon, name: &str, f: impl FnOnce(&mut ProfileSpec)) {
    let path = d.dir.join(format!("profiles/{name}/profile.toml"));
    let mut spec = ProfileSpec::from_toml(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut spec);
    std::fs::write(&path, spec.to_toml().unwrap()).unwrap();
}

fn post(d: &Daemon, path: &str, body: Value) -> (u16, Value) {
    let a = d
        .client()
        .raw("POST", path, Some(body.to_string().as_bytes()))
        .unwrap();
    let v = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
    (a.status, v)
}

fn audit(d: &Daemon, event: &str) -> Vec<String> {
    let list: Vec<handset::Event> = d
        .client()
        .call("GET", "/v1/audit?limit=1000", None::<&()>)
        .unwrap();
    list.into_iter()
        .filter(|e| e.event == event)
        .map(|e| format!("{} {}", e.profile, e.detail))
        .collect()
}

#[test]
fn clipboard_and_files_follow_the_policy_and_are_audited() {
    if !can_run_vms("clipboard_and_files_follow_the_policy_and_are_audited") {
        return;
    }
    let d = Daemon::start("channels");
    let info: handset::DaemonInfo = d.client().call("GET", "/v1/handset", None::<&()>).unwrap();
    if info.probe.is_none() {
        loud("SKIP (probe guest not built: guest/build-probe.sh): channels test");
        return;
    }
    // The template policies: personal may send to work, work to nobody (a peer must exist
    // when named: work first).
    create_agent_profile(&d, "work", "");
    create_agent_profile(
        &d,
        "personal",
        "clipboard_to = [\"work\"]\nfiles_to = [\"work\"]",
    );
    for p in ["personal", "work"] {
        d.act(p, "start").unwrap();
        assert!(
            wait_until(Duration::from_secs(60), || d
                .serial(p)
                .contains("PROBE agent listening")),
            "{p} agent did not start: {}",
            d.serial(p)
        );
    }
    let h = agent(&d, "work", json!({"op": "health"}));
    assert_eq!(h["agent"], "probe");
    assert_eq!(h["version"], 1);

    // "The user copies text in personal", then pastes in work.
    let text = "meeting at 10:00 \u{2713}".as_bytes();
    set_clipboard(&d, "personal", text);
    let out = d.cli(&["clipboard", "copy", "--from", "personal", "--to", "work"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{} bytes from personal to work", text.len())),
        "{stdout}"
    );
    assert_eq!(clipboard(&d, "work"), text);

    // work -> personal is denied: 403 over the API, exit 1 and one line from the CLI, and
    // personal's clipboard keeps its content.
    set_clipboard(&d, "work", b"work secret");
    let (status, body) = post(
        &d,
        "/v1/channels/clipboard",
        json!({"from": "work", "to": "personal"}),
    );
    assert_eq!(status, 403, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("denied by policy") && msg.contains("clipboard_to"),
        "{msg}"
    );
    let out = d.cli(&["clipboard", "copy", "--from", "work", "--to", "personal"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // "Refused by policy" has its own exit status (4).
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("denied by policy"), "{stderr}");
    assert_eq!(clipboard(&d, "personal"), text);

    // Files: personal -> work allowed (the JSON output carries the digest), back denied.
    let file: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let put = agent(
        &d,
        "personal",
        json!({"op": "file_put", "name": "notes.txt", "data_b64": b64::encode(&file)}),
    );
    assert_eq!(put["ok"], true, "{put}");
    let out = d.cli(&[
        "send-file",
        "--from",
        "personal",
        "--to",
        "work",
        "notes.txt",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: Transfer = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (t.bytes, t.sha256.as_str()),
        (3000, sha256_hex(&file).as_str())
    );
    let got = agent(&d, "work", json!({"op": "file_get", "name": "notes.txt"}));
    assert_eq!(
        b64::decode(got["data_b64"].as_str().unwrap()).unwrap(),
        file
    );
    let list = agent(&d, "work", json!({"op": "file_list"}));
    assert_eq!(list["files"], json!([{"name": "notes.txt", "bytes": 3000}]));
    let (status, _) = post(
        &d,
        "/v1/channels/file",
        json!({"from": "work", "to": "personal", "name": "notes.txt"}),
    );
    assert_eq!(status, 403);
    assert_eq!(
        agent(&d, "personal", json!({"op": "file_list"}))["files"],
        json!([{"name": "notes.txt", "bytes": 3000}])
    );
    // Bad requests never reach a guest.
    for (body, want) in [
        (
            json!({"from": "personal", "to": "work", "name": "../etc/passwd"}),
            400,
        ),
        (
            json!({"from": "personal", "to": "personal", "name": "x"}),
            400,
        ),
        (json!({"from": "personal", "to": "nope", "name": "x"}), 404),
        (json!({"from": "personal", "to": "work"}), 400),
    ] {
        let (status, b) = post(&d, "/v1/channels/file", body.clone());
        assert_eq!(status, want, "{body} -> {b}");
    }
    // A missing file is the source agent's refusal (502), audited as allowed but failed.
    let (status, b) = post(
        &d,
        "/v1/channels/file",
        json!({"from": "personal", "to": "work", "name": "nothere"}),
    );
    assert_eq!(status, 502, "{b}");
    assert!(b["error"].as_str().unwrap().contains("no such file"), "{b}");

    // Audit: every attempt, with its decision; the allowed ones with size and digest.
    let clip = audit(&d, "channel-clipboard");
    assert_eq!(clip.len(), 3, "{clip:#?}");
    assert!(clip[0].starts_with("personal from=personal to=work decision=allowed result=ok"));
    // The audit log holds a keyed digest: a reader without audit.key cannot confirm a guess.
    let key = handset::audit_key::AuditKey::load_or_create(&d.dir.join("audit.key")).unwrap();
    assert!(
        clip[0].contains(&format!("hmac-sha256={}", key.digest(text))),
        "{}",
        clip[0]
    );
    assert!(!clip[0].contains(&sha256_hex(text)), "{}", clip[0]);
    assert!(clip[1].contains("decision=denied"), "{}", clip[1]);
    assert!(clip[2].contains("decision=denied"), "{}", clip[2]);
    let files = audit(&d, "channel-file");
    assert_eq!(files.len(), 4, "{files:#?}");
    assert!(files[0].contains("name=notes.txt decision=allowed result=ok bytes=3000"));
    assert!(files[1].contains("decision=denied"));
    // The unknown target: no decision was possible.
    assert!(
        files[2].contains("to=nope name=x decision=none result=error"),
        "{}",
        files[2]
    );
    assert!(files[3].contains("decision=allowed result=error"));
    let out = d.cli(&["audit"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("channel-clipboard"));

    // Opening work -> personal in work's spec flips the decision ...
    edit_spec(&d, "work", |s| {
        s.channels.clipboard_to = vec!["personal".into()]
    });
    let (status, b) = post(
        &d,
        "/v1/channels/clipboard",
        json!({"from": "work", "to": "personal"}),
    );
    assert_eq!(status, 200, "{b}");
    assert_eq!(clipboard(&d, "personal"), b"work secret");
    // ... and the receiver can still refuse on its side.
    edit_spec(&d, "personal", |s| {
        s.channels.clipboard_from = Some(vec!["home".into()])
    });
    let (status, b) = post(
        &d,
        "/v1/channels/clipboard",
        json!({"from": "work", "to": "personal"}),
    );
    assert_eq!(status, 403, "{b}");
    assert!(
        b["error"].as_str().unwrap().contains("clipboard_from"),
        "{b}"
    );

    // A stopped profile cannot take part.
    d.act("work", "stop").unwrap();
    let (status, b) = post(
        &d,
        "/v1/channels/clipboard",
        json!({"from": "personal", "to": "work"}),
    );
    assert_eq!(status, 409, "{b}");
    assert!(Path::new(&d.dir).join("handset.db").is_file());
}

/// Sends raw bytes (one or more lines) to a profile's agent and reads `n` answer lines.
fn agent_raw(d: &Daemon, profile: &str, bytes: &[u8], n: usize) -> Vec<Value> {
    let sock = d.dir.join(format!("profiles/{profile}/run/vsock.sock"));
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    s.write_all(b"CONNECT 1025\n").unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    s.write_all(bytes).unwrap();
    (0..n)
        .map(|_| {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
        })
        .collect()
}

#[test]
fn probe_agent_refuses_hostile_requests_and_keeps_serving() {
    if !can_run_vms("probe_agent_refuses_hostile_requests_and_keeps_serving") {
        return;
    }
    let d = Daemon::start("agent-hostile");
    let info: handset::DaemonInfo = d.client().call("GET", "/v1/handset", None::<&()>).unwrap();
    if info.probe.is_none() {
        loud("SKIP (probe guest not built: guest/build-probe.sh): agent hostile test");
        return;
    }
    create_agent_profile(&d, "lab", "");
    d.act("lab", "start").unwrap();
    assert!(wait_until(Duration::from_secs(60), || d
        .serial("lab")
        .contains("PROBE agent listening")));
    let bad: &[&[u8]] = &[
        b"not json",
        b"{}",
        b"{\"op\":\"nope\"}",
        b"{\"op\":\"health\",\"extra\":\"x\"}",
        b"{\"op\":\"clipboard_set\",\"data_b64\":\"a\\u0041==\"}",
        b"{\"op\":\"clipboard_set\",\"data_b64\":\"a!==\"}",
        b"{\"op\":\"clipboard_set\",\"mime\":\"text plain\",\"data_b64\":\"\"}",
        b"{\"op\":\"file_put\",\"name\":\"../x\",\"data_b64\":\"aGk=\"}",
        b"{\"op\":\"file_put\",\"name\":\".x\",\"data_b64\":\"aGk=\"}",
        b"{\"op\":\"file_put\",\"name\":\"x\"}",
        b"{\"op\":\"file_get\",\"name\":\"missing\"}",
        b"{\"op\":\"health\"} trailing",
        b"{\"op\":\"health\"",
    ];
    let mut all = Vec::new();
    for line in bad {
        all.extend_from_slice(line);
        all.push(b'\n');
    }
    // Pipelined on one connection: one answer per line, in order.
    let answers = agent_raw(&d, "lab", &all, bad.len());
    for (line, a) in bad.iter().zip(&answers) {
        assert_eq!(a["ok"], false, "{} -> {a}", String::from_utf8_lossy(line));
        assert!(a["error"].as_str().is_some_and(|e| !e.is_empty()), "{a}");
    }
    // Too large for the probe: 64 KiB + 3 bytes of clipboard (the probe runs its code very
    // slowly under kvm_pvm: about 30 us per byte of request, so this takes seconds).
    let big = b64::encode(&vec![7u8; 65539]);
    let a = agent_raw(
        &d,
        "lab",
        format!("{{\"op\":\"clipboard_set\",\"data_b64\":\"{big}\"}}\n").as_bytes(),
        1,
    );
    assert_eq!(a[0]["ok"], false, "{}", a[0]);
    // A fifth file does not fit the probe's inbox of four.
    for i in 0..4 {
        let put = agent(
            &d,
            "lab",
            json!({"op": "file_put", "name": format!("f{i}"), "data_b64": "aGk="}),
        );
        assert_eq!(put["ok"], true, "{put}");
    }
    let fifth = agent(
        &d,
        "lab",
        json!({"op": "file_put", "name": "f4", "data_b64": "aGk="}),
    );
    assert_eq!(fifth["ok"], false, "{fifth}");
    // Replacing an existing name still works, and the agent is healthy after all that.
    let again = agent(
        &d,
        "lab",
        json!({"op": "file_put", "name": "f0", "data_b64": "aGk="}),
    );
    assert_eq!(again["ok"], true);
    assert_eq!(agent(&d, "lab", json!({"op": "health"}))["ok"], true);
    assert_eq!(d.show("lab").state, handset::ProfileState::Running);
}

#[test]
fn a_paused_background_profile_is_resumed_for_the_transfer_only() {
    if !can_run_vms("a_paused_background_profile_is_resumed_for_the_transfer_only") {
        return;
    }
    let d = Daemon::start("channels-paused");
    let info: handset::DaemonInfo = d.client().call("GET", "/v1/handset", None::<&()>).unwrap();
    if info.probe.is_none() {
        loud("SKIP (probe guest not built: guest/build-probe.sh): channels paused test");
        return;
    }
    create_agent_profile(&d, "work", "");
    create_agent_profile_with(
        &d,
        "personal",
        "background = \"pause\"",
        "clipboard_to = [\"work\"]",
    );
    for p in ["personal", "work"] {
        d.act(p, "start").unwrap();
        assert!(wait_until(Duration::from_secs(60), || d
            .serial(p)
            .contains("PROBE agent listening")));
    }
    // Copy in personal (foreground), then switch to work: personal is paused.
    d.act("personal", "switch").unwrap();
    set_clipboard(&d, "personal", b"copied before the switch");
    d.act("work", "switch").unwrap();
    assert_eq!(d.show("personal").state, handset::ProfileState::Paused);
    let (status, b) = post(
        &d,
        "/v1/channels/clipboard",
        json!({"from": "personal", "to": "work"}),
    );
    assert_eq!(status, 200, "{b}");
    assert_eq!(clipboard(&d, "work"), b"copied before the switch");
    // personal is paused again: its agent does not answer, its state is unchanged.
    assert_eq!(d.show("personal").state, handset::ProfileState::Paused);
    let sock = d.dir.join("profiles/personal/run/vsock.sock");
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s.write_all(b"CONNECT 1025\n").unwrap();
    let mut line = String::new();
    let r = BufReader::new(s).read_line(&mut line);
    assert!(
        r.is_err() || line.is_empty(),
        "a paused guest answered: {line:?}"
    );
}

/// The README's walk-through: two profiles from the templates (which run the probe's agent
/// and count), then `profile clipboard copy --from personal --to work`.
#[test]
fn the_readme_clipboard_copy_works_with_the_templates() {
    if !can_run_vms("the_readme_clipboard_copy_works_with_the_templates") {
        return;
    }
    let d = Daemon::start("readme-clip");
    for t in ["work", "personal"] {
        let out = d.cli(&["create", t, "--template", t]);
        assert!(out.status.success(), "{out:?}");
        let out = d.cli(&["start", t]);
        assert!(out.status.success(), "{out:?}");
    }
    for p in ["personal", "work"] {
        assert!(
            wait_until(Duration::from_secs(60), || {
                let s = d.serial(p);
                s.contains("PROBE agent listening") && s.contains("PROBE counter 2")
            }),
            "{p}: {}",
            d.serial(p)
        );
    }
    set_clipboard(&d, "personal", b"from the README");
    let out = d.cli(&["clipboard", "copy", "--from", "personal", "--to", "work"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("15 bytes from personal to work"), "{said}");
    assert_eq!(clipboard(&d, "work"), b"from the README");

    // `list` and `show` say which profiles have an agent: the templates' probe agents do, a
    // counting probe (no agent mode) does not, a stopped profile has no VMM to ask.
    d.create_probe("counter", 64, "");
    d.create_probe("idle", 64, "");
    assert!(d.act("counter", "start").is_ok());
    let out = d.cli(&["list"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{table}");
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row {name} in {table}"))
            .to_string()
    };
    assert!(table.lines().next().unwrap().contains("AGENT"), "{table}");
    for p in ["work", "personal"] {
        assert!(row(p).contains("probe v1"), "{table}");
        let info = d.show(p);
        let agent = info.agent.expect("a template's agent answers");
        assert_eq!((agent.kind.as_str(), agent.version), ("probe", 1));
    }
    assert!(!row("counter").contains("probe v"), "{table}");
    assert!(!row("idle").contains("probe v"), "{table}");
    let out = d.cli(&["show", "counter"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("agent:      none answering"), "{said}");
    let out = d.cli(&["show", "idle"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("agent:      - (no VMM)"), "{said}");
    let out = d.cli(&["show", "work"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("agent:      probe (agent protocol v1)"),
        "{said}"
    );
}

/// The host's own channels with the templates: `profile clipboard set|get` and `profile file
/// push|pull` go through the agents under the profiles' rules for the peer `host` (personal
/// gives and takes, work only takes: reading it exits 4), each attempt audited, and a pull
/// writes exactly its LOCAL file.
#[test]
fn the_host_sets_and_reads_clipboards_and_moves_files() {
    if !can_run_vms("the_host_sets_and_reads_clipboards_and_moves_files") {
        return;
    }
    let d = Daemon::start("host-data");
    for t in ["work", "personal"] {
        let out = d.cli(&["create", t, "--template", t]);
        assert!(out.status.success(), "{out:?}");
        let out = d.cli(&["start", t]);
        assert!(out.status.success(), "{out:?}");
    }
    for p in ["personal", "work"] {
        assert!(
            wait_until(Duration::from_secs(60), || d
                .serial(p)
                .contains("PROBE agent listening")),
            "{p}: {}",
            d.serial(p)
        );
    }
    let ok = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let refused = |out: &std::process::Output| {
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(4), "{stderr}");
        assert!(stderr.contains("denied by policy"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        stderr
    };

    // Clipboard: set and read back personal's; work takes from the host but gives nothing.
    let said = ok(&d.cli(&["clipboard", "set", "personal", "hello from the host"]));
    assert!(said.contains("19 bytes from host to personal"), "{said}");
    assert_eq!(clipboard(&d, "personal"), b"hello from the host");
    let got = ok(&d.cli(&["clipboard", "get", "personal"]));
    assert_eq!(got, "hello from the host");
    ok(&d.cli(&["clipboard", "set", "work", "paste this"]));
    assert_eq!(clipboard(&d, "work"), b"paste this");
    let why = refused(&d.cli(&["clipboard", "get", "work"]));
    assert!(why.contains("clipboard_to does not include host"), "{why}");

    // Files: a push lands in the inbox; personal's comes back byte for byte.
    let scratch = d.dir.join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 13).to_le_bytes()[0]).collect();
    let local = scratch.join("report.bin");
    std::fs::write(&local, &data).unwrap();
    let lp = local.to_str().unwrap();
    ok(&d.cli(&["file", "push", "personal", lp]));
    let got = agent(
        &d,
        "personal",
        json!({"op": "file_get", "name": "report.bin"}),
    );
    assert_eq!(
        b64::decode(got["data_b64"].as_str().unwrap()).unwrap(),
        data
    );
    let back = scratch.join("back.bin");
    let said = ok(&d.cli(&[
        "file",
        "pull",
        "personal",
        "report.bin",
        back.to_str().unwrap(),
    ]));
    assert!(said.contains("5000 bytes from personal to host"), "{said}");
    assert_eq!(std::fs::read(&back).unwrap(), data);
    // An existing LOCAL is kept unless --force; a symlink there is replaced, not followed.
    let victim = scratch.join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let link = scratch.join("link.bin");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let lk = link.to_str().unwrap();
    let out = d.cli(&["file", "pull", "personal", "report.bin", lk]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    ok(&d.cli(&["file", "pull", "personal", "report.bin", lk, "--force"]));
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert_eq!(std::fs::read(&link).unwrap(), data);
    // Inbox names are names, never paths: refused before anything is sent.
    let out = d.cli(&["file", "pull", "personal", "../../etc/passwd"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let (status, _) = {
        let a = d
            .client()
            .raw("GET", "/v1/profiles/personal/files/..", None)
            .unwrap();
        (a.status, a.body)
    };
    assert_eq!(status, 400);
    // work accepts files from the host, and keeps them.
    ok(&d.cli(&["file", "push", "work", lp, "from-host.bin"]));
    refused(&d.cli(&[
        "file",
        "pull",
        "work",
        "from-host.bin",
        scratch.to_str().unwrap(),
    ]));
    assert!(!scratch.join("from-host.bin").exists());

    // Every attempt is audited, the refusals too.
    let clip = audit(&d, "channel-clipboard");
    assert!(
        clip.iter()
            .any(|l| l.starts_with("work from=work to=host decision=denied")),
        "{clip:?}"
    );
    assert!(
        clip.iter()
            .any(|l| l
                .starts_with("personal from=host to=personal decision=allowed result=ok bytes=19")),
        "{clip:?}"
    );
    let files = audit(&d, "channel-file");
    assert!(
        files.iter().any(|l| l.starts_with(
            "personal from=personal to=host name=report.bin decision=allowed result=ok bytes=5000"
        )),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .any(|l| l.starts_with("work from=work to=host name=from-host.bin decision=denied")),
        "{files:?}"
    );
}
