//! The OpenAPI document (docs/api/handset.openapi.yaml) matches the code: the same routes as
//! `handset::api::ROUTES`, and real answers of an in-process daemon validate against the
//! documented schemas (required properties, types, enums, no undocumented properties).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use handset::client::{Answer, Client};
use serde_json::{json, Value};

fn doc() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/api/handset.openapi.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

const METHODS: &[&str] = &["get", "put", "post", "delete", "patch", "head", "options"];

#[test]
fn documented_routes_are_the_served_routes() {
    let doc = doc();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (k, _) in item.as_object().unwrap() {
            if METHODS.contains(&k.as_str()) {
                documented.insert((k.to_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = handset::api::ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, served);
}

/// Resolves a local `$ref`.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let ptr = r.strip_prefix('#').expect("local refs only");
            resolve(
                doc,
                doc.pointer(ptr).unwrap_or_else(|| panic!("bad ref {r}")),
            )
        }
        None => schema,
    }
}

/// Checks `v` against `schema`; returns the problems found, with their JSON path.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let s = resolve(doc, schema);
    if v.is_null() {
        if s.get("nullable") != Some(&Value::Bool(true)) {
            errs.push(format!("{at}: null but not nullable"));
        }
        return;
    }
    if let Some(en) = s.get("enum").and_then(Value::as_array) {
        if !en.contains(v) {
            errs.push(format!("{at}: {v} not in {en:?}"));
        }
    }
    let ty = s.get("type").and_then(Value::as_str);
    let ok = match ty {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        None => true,
        Some(t) => panic!("unknown type {t}"),
    };
    if !ok {
        errs.push(format!("{at}: {v} is not {}", ty.unwrap_or("?")));
        return;
    }
    if let (Some("object"), Some(obj)) = (ty, v.as_object()) {
        let props = s.get("properties").and_then(Value::as_object);
        for req in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let k = req.as_str().unwrap();
            if !obj.contains_key(k) {
                errs.push(format!("{at}: required {k} missing"));
            }
        }
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(doc, ps, val, &format!("{at}.{k}"), errs),
                None => errs.push(format!("{at}: undocumented property {k}")),
            }
        }
    }
    if let (Some("array"), Some(items), Some(arr)) = (ty, s.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            validate(doc, items, item, &format!("{at}[{i}]"), errs);
        }
    }
}

/// Checks an answer against the documented response of (method, path) for its status.
fn check(doc: &Value, method: &str, path: &str, a: &Answer) {
    let op = &doc["paths"][path][method.to_lowercase()];
    assert!(op.is_object(), "{method} {path} is not documented");
    let resp = op["responses"]
        .get(a.status.to_string())
        .unwrap_or_else(|| panic!("{method} {path}: status {} is not documented", a.status));
    let resp = resolve(doc, resp);
    match resp.pointer("/content/application~1json/schema") {
        Some(schema) => {
            let v: Value = serde_json::from_slice(&a.body).unwrap_or_else(|e| {
                panic!("{method} {path}: body is not JSON ({e}): {:?}", a.body)
            });
            let mut errs = vec![];
            validate(doc, schema, &v, "$", &mut errs);
            assert!(
                errs.is_empty(),
                "{method} {path} {}: {errs:#?}\n{v:#}",
                a.status
            );
        }
        None => assert!(a.body.is_empty(), "{method} {path}: undocumented body"),
    }
}

/// Sends one request and checks its answer against the document's `route`.
fn checked_call(
    doc: &Value,
    c: &Client,
    method: &str,
    url: &str,
    route: &str,
    body: Option<Value>,
) -> Answer {
    let data = body.map(|b| serde_json::to_vec(&b).unwrap());
    let a = c.raw(method, url, data.as_deref()).unwrap();
    check(doc, method, route, &a);
    a
}

/// In-process daemons started so far (each gets its own cgroup parent).
static DAEMONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// An in-process daemon on a temporary state directory.
struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
    _tmp: tempfile::TempDir,
}

impl InProcess {
    fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let state_dir = handset::StateDir::new(tmp.path()).unwrap();
        let socket = state_dir.socket();
        let bin = common::pv_bin();
        let opts = handset::Options {
            state_dir,
            probe: handset::find_probe(&bin),
            vmm_bin: bin,
            // One per daemon: two tests' daemons sharing a parent remove it under each other.
            cgroup_parent: format!(
                "pvtest-openapi-{}-{}",
                std::process::id(),
                DAEMONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ),
            jail: false,
            phone: None,
            drop_audit_every: handset::net_drops::DEFAULT_EVERY,
            mdm: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(handset::run_until(opts, async {
                let _ = rx.await;
            }))
            .unwrap();
        });
        let client = Client::new(&socket);
        assert!(common::wait_until(
            std::time::Duration::from_secs(10),
            || client.raw("GET", "/v1/handset", None).is_ok()
        ));
        Self {
            stop: Some(tx),
            thread: Some(thread),
            socket,
            _tmp: tmp,
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn answers_match_the_documented_schemas() {
    let doc = doc();
    let d = InProcess::start();
    let c = Client::new(&d.socket);
    let call = |method: &str, url: &str, route: &str, body: Option<Value>| {
        checked_call(&doc, &c, method, url, route, body)
    };
    call("GET", "/v1/handset", "/v1/handset", None);
    // Encrypted at rest: the policy applied below asks for it.
    let created = call(
        "POST",
        "/v1/profiles",
        "/v1/profiles",
        Some(json!({"name": "work", "template": "work", "encrypt_at_rest": true})),
    );
    assert_eq!(created.status, 201);
    let spec = json!({"spec": {"name": "lab", "kernel": "probe", "memory_mib": 96,
        "disks": [{"name": "root", "size_mib": 4}], "net": "tap-lab", "memory_max_mib": 400,
        "background": "suspend", "restart": "always"}});
    assert_eq!(
        call("POST", "/v1/profiles", "/v1/profiles", Some(spec)).status,
        201
    );
    // Errors: duplicate (409), bad body (400), bad name (400), unknown profile (404).
    let dup = call(
        "POST",
        "/v1/profiles",
        "/v1/profiles",
        Some(json!({"name": "work", "template": "work"})),
    );
    assert_eq!(dup.status, 409);
    let bad = call(
        "POST",
        "/v1/profiles",
        "/v1/profiles",
        Some(json!({"template": 7})),
    );
    assert_eq!(bad.status, 400);
    let unknown = call("GET", "/v1/profiles/nope", "/v1/profiles/{name}", None);
    assert_eq!(unknown.status, 404);
    let badname = call("GET", "/v1/profiles/UPPER", "/v1/profiles/{name}", None);
    assert_eq!(badname.status, 400);
    let not_running = call(
        "POST",
        "/v1/profiles/work/stop",
        "/v1/profiles/{name}/stop",
        None,
    );
    assert_eq!(not_running.status, 409);
    let no_snapshot = call(
        "POST",
        "/v1/profiles/work/resume",
        "/v1/profiles/{name}/resume",
        None,
    );
    assert_eq!(no_snapshot.status, 409);
    call(
        "POST",
        "/v1/profiles/work/switch",
        "/v1/profiles/{name}/switch",
        None,
    );
    call(
        "POST",
        "/v1/profiles/work/suspend",
        "/v1/profiles/{name}/suspend",
        None,
    );
    // The cloud: a stopped profile is not offloaded or cloned, nor returned; bad hosts and
    // bodies are 400 before anything is looked at.
    for (route, body, status) in [
        ("offload", Some(json!({"to": "127.0.0.1:7000"})), 409),
        ("offload", Some(json!({"to": "no port"})), 400),
        ("offload", Some(json!({"to": 7})), 400),
        ("offload", Some(json!({"to": "h:1", "extra": true})), 400),
        ("clone", Some(json!({"to": "127.0.0.1:7000"})), 409),
        ("clone", Some(json!({})), 400),
        ("return", None, 409),
        (
            "clone/files",
            Some(json!({"name": "a.txt", "as": "b.txt"})),
            409,
        ),
        ("clone/files", Some(json!({"name": "../a"})), 400),
        ("clone/files", Some(json!({"name": "a", "to": "b"})), 400),
        // The work template sends files nowhere, its clone (`cloud`) included.
        (
            "clone/files",
            Some(json!({"name": "a.txt", "direction": "to-clone"})),
            403,
        ),
        (
            "clone/files",
            Some(json!({"name": "a", "direction": "up"})),
            400,
        ),
    ] {
        let a = call(
            "POST",
            &format!("/v1/profiles/work/{route}"),
            &format!("/v1/profiles/{{name}}/{route}"),
            body,
        );
        assert_eq!(a.status, status, "{route}");
    }

    // IT policies: none in force, a profile that does not exist, refused and bad bodies.
    let st = call(
        "GET",
        "/v1/profiles/work/policy",
        "/v1/profiles/{name}/policy",
        None,
    );
    assert_eq!(st.status, 200);
    let st: Value = serde_json::from_slice(&st.body).unwrap();
    assert!(st["policy"].is_null() && st["screen"]["capture"] == json!(true));
    let missing = call(
        "GET",
        "/v1/profiles/nope/policy",
        "/v1/profiles/{name}/policy",
        None,
    );
    assert_eq!(missing.status, 404);
    let unsigned = call(
        "POST",
        "/v1/policies",
        "/v1/policies",
        Some(json!({"envelope": "version = 1\nissued_at = 1\nprofile = \"work\"\n"})),
    );
    assert_eq!(unsigned.status, 403);
    let bad = call(
        "POST",
        "/v1/policies",
        "/v1/policies",
        Some(json!({"envelope": 7})),
    );
    assert_eq!(bad.status, 400);
    // A policy with every section (its boot rules let the probe run below), applied and
    // shown.
    let org = policy::OrgSecretKey::generate();
    let dir = handset::StateDir::new(d._tmp.path()).unwrap();
    handset::org_policy::trust(&dir, &org.public(), false).unwrap();
    let doc = format!(
        "version = 4\nissued_at = {}\nexpires_at = {}\nprofile = \"work\"\n\
         [network]\ndefault = \"deny\"\nrules = [{{ action = \"allow\", cidr = \"10.0.0.0/8\", \
         protocol = \"tcp\", ports = \"443\" }}, {{ action = \"deny\" }}]\n\
         [storage]\nencrypt_at_rest = true\n[channels]\nfiles_from = []\n\
         [screen]\nremote_view = false\n[boot]\nmin_pocketvisor = \"0.1.0\"\n\
         [offline]\nmax_offline_secs = 86400\n",
        // Issued a minute ago: its offline limit (a day) lets the profile run below.
        policy::unix_now() - 60,
        policy::unix_now() + 3600
    );
    let envelope = String::from_utf8(policy::sign(doc.as_bytes(), &org).unwrap()).unwrap();
    let applied = call(
        "POST",
        "/v1/policies",
        "/v1/policies",
        Some(json!({ "envelope": envelope })),
    );
    assert_eq!(applied.status, 200);
    let again = call(
        "POST",
        "/v1/policies",
        "/v1/policies",
        Some(json!({ "envelope": envelope })),
    );
    let again: Value = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(
        (again["changed"].clone(), again["replaced"].clone()),
        (json!(false), json!(4))
    );
    let st = call(
        "GET",
        "/v1/profiles/work/policy",
        "/v1/profiles/{name}/policy",
        None,
    );
    let st: Value = serde_json::from_slice(&st.body).unwrap();
    assert_eq!(st["policy"]["network"]["rules"][0]["ports"], json!("443"));
    assert_eq!(st["screen"]["remote_view"], json!(false));

    // Lock and unlock (a stopped profile: no guest to pause).
    let lock = |m: &str, path: &str, body| call(m, &path.replace("{name}", "lab"), path, body);
    assert_eq!(lock("POST", "/v1/profiles/{name}/lock", None).status, 409);
    let code = json!({"passcode": "2468-lab"});
    assert_eq!(
        lock(
            "PUT",
            "/v1/profiles/{name}/passcode",
            Some(json!({"passcode": "1"}))
        )
        .status,
        400
    );
    assert_eq!(
        lock("PUT", "/v1/profiles/{name}/passcode", Some(code.clone())).status,
        204
    );
    let locked = lock("POST", "/v1/profiles/{name}/lock", None);
    let locked: handset::ProfileInfo = serde_json::from_slice(&locked.body).unwrap();
    assert!(locked.locked);
    assert_eq!(
        lock("POST", "/v1/profiles/{name}/start", None).status,
        403,
        "a locked profile starts"
    );
    let wrong = json!({"passcode": "1357-lab"});
    assert_eq!(
        lock("POST", "/v1/profiles/{name}/unlock", Some(wrong)).status,
        403
    );
    assert_eq!(
        lock("POST", "/v1/profiles/{name}/unlock", Some(code)).status,
        200
    );
    assert_eq!(
        lock(
            "POST",
            "/v1/profiles/{name}/unlock",
            Some(json!({"passcode": "2468-lab"}))
        )
        .status,
        409
    );
    // A wipe of a profile made for it.
    let made = call(
        "POST",
        "/v1/profiles",
        "/v1/profiles",
        Some(json!({"name": "gone", "template": "work", "encrypt_at_rest": true})),
    );
    assert_eq!(made.status, 201);
    let wiped = call(
        "POST",
        "/v1/profiles/gone/wipe",
        "/v1/profiles/{name}/wipe",
        None,
    );
    let wiped: Value = serde_json::from_slice(&wiped.body).unwrap();
    assert_eq!(wiped, json!({"profile": "gone", "crypto_erased": true}));
    assert_eq!(
        call(
            "POST",
            "/v1/profiles/gone/wipe",
            "/v1/profiles/{name}/wipe",
            None
        )
        .status,
        404
    );

    let list = call("GET", "/v1/profiles", "/v1/profiles", None);
    let v: Vec<handset::ProfileInfo> = serde_json::from_slice(&list.body).unwrap();
    assert_eq!(v.len(), 2);
    call("GET", "/v1/profiles/lab", "/v1/profiles/{name}", None);

    if common::can_run_vms("answers_match_the_documented_schemas (running part)")
        && common::pv_bin().is_file()
    {
        let s = call(
            "POST",
            "/v1/profiles/work/start",
            "/v1/profiles/{name}/start",
            None,
        );
        assert_eq!(s.status, 200, "{}", String::from_utf8_lossy(&s.body));
        call(
            "POST",
            "/v1/profiles/work/switch",
            "/v1/profiles/{name}/switch",
            None,
        );
        call("GET", "/v1/handset", "/v1/handset", None);
        call("GET", "/v1/profiles", "/v1/profiles", None);
        call(
            "POST",
            "/v1/profiles/work/stop",
            "/v1/profiles/{name}/stop",
            None,
        );
    }
    call(
        "GET",
        "/v1/profiles/work/events?limit=5",
        "/v1/profiles/{name}/events",
        None,
    );
    call("GET", "/v1/events", "/v1/events", None);
    call("GET", "/v1/audit?limit=1000", "/v1/audit", None);
    // Bad query strings are 400s with the JSON error body; a limit above the maximum is
    // refused, not clamped; a profile that does not exist has no events (404).
    for (url, route) in [
        ("/v1/audit?limit=10001", "/v1/audit"),
        ("/v1/events?limit=lots", "/v1/events"),
        (
            "/v1/profiles/work/events?limit=-1",
            "/v1/profiles/{name}/events",
        ),
    ] {
        let a = call("GET", url, route, None);
        assert_eq!(a.status, 400, "{url}");
        assert!(
            serde_json::from_slice::<handset::api_types::ErrorBody>(&a.body).is_ok(),
            "{url}"
        );
    }
    let ghost = call(
        "GET",
        "/v1/profiles/ghost/events",
        "/v1/profiles/{name}/events",
        None,
    );
    assert_eq!(ghost.status, 404);
    let bad_flag = call(
        "POST",
        "/v1/profiles/work/stop?discard=maybe",
        "/v1/profiles/{name}/stop",
        None,
    );
    assert_eq!(bad_flag.status, 400);
    let del = call("DELETE", "/v1/profiles/lab", "/v1/profiles/{name}", None);
    assert_eq!(del.status, 204);
    let del_again = call("DELETE", "/v1/profiles/lab", "/v1/profiles/{name}", None);
    assert_eq!(del_again.status, 404);
    // Gone from /v1/profiles/lab/..., its history kept in /v1/events?profile=lab.
    let gone = call(
        "GET",
        "/v1/profiles/lab/events",
        "/v1/profiles/{name}/events",
        None,
    );
    assert_eq!(gone.status, 404);
    let history = call("GET", "/v1/events?profile=lab", "/v1/events", None);
    let history: Vec<handset::Event> = serde_json::from_slice(&history.body).unwrap();
    let names: Vec<&str> = history.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names.first(), Some(&"created"), "{names:?}");
    assert_eq!(names.last(), Some(&"deleted"), "{names:?}");
    assert!(history.iter().all(|e| e.profile == "lab"));
    let bad = call("GET", "/v1/events?profile=-x", "/v1/events", None);
    assert_eq!(bad.status, 400);
    // An unknown route answers 404 with the error body.
    let a = c.raw("GET", "/v2/whatever", None).unwrap();
    assert_eq!(a.status, 404);
    assert!(serde_json::from_slice::<handset::api_types::ErrorBody>(&a.body).is_ok());
}

/// What the issue's schemathesis run found, each answered as the document says: create
/// checks the assets and the spec rules (400, nothing created), invalid names are 400s and
/// unknown profiles 404s on every per-profile route, a wrong method is a 405 with the JSON
/// error body (schemathesis checks its `Allow` header).
#[test]
fn the_server_answers_what_the_document_says() {
    let doc = doc();
    let d = InProcess::start();
    let c = Client::new(&d.socket);
    let call = |method: &str, url: &str, route: &str, body: Option<Value>| {
        checked_call(&doc, &c, method, url, route, body)
    };
    let assets = d.socket.parent().unwrap().join("assets");
    std::fs::write(assets.join("k.elf"), b"a kernel").unwrap();
    std::fs::create_dir(assets.join("initrd-dir")).unwrap();
    let spec = |extra: Value| {
        let mut s = json!({"name": "lab", "kernel": "k.elf", "memory_mib": 64});
        s.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({ "spec": s })
    };
    for (body, needle) in [
        (spec(json!({"initrd": ""})), "initrd \"\" is not allowed"),
        (spec(json!({"initrd": "missing.img"})), "does not exist"),
        (spec(json!({"initrd": "initrd-dir"})), "is a directory"),
        (spec(json!({"kernel": "nope.elf"})), "does not exist"),
        (spec(json!({"cmdline": "a\nb"})), "printable ASCII"),
        (spec(json!({"memory_max_mib": 4194304})), "above"),
        (spec(json!({"name": "-lab"})), "not beginning with -"),
        (
            spec(json!({"disks": [{"name": "a", "size_mib": 4194305}]})),
            "size_mib",
        ),
        (
            spec(json!({"channels": {"clipboard_to": ["Bad"], "files_to": []}})),
            "channel peer",
        ),
        (
            json!({"name": "lab", "template": "work", "spec": spec(json!({}))["spec"]}),
            "exactly one",
        ),
        (json!({"template": "work"}), "\"name\" is required"),
    ] {
        let a = call("POST", "/v1/profiles", "/v1/profiles", Some(body.clone()));
        let e: handset::api_types::ErrorBody = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(a.status, 400, "{body}: {}", e.error);
        assert!(e.error.contains(needle), "{body}: {}", e.error);
    }
    let list: Vec<handset::ProfileInfo> = c.call("GET", "/v1/profiles", None::<&()>).unwrap();
    assert!(list.is_empty(), "a refused create left {list:?}");
    let ok = call(
        "POST",
        "/v1/profiles",
        "/v1/profiles",
        Some(spec(json!({}))),
    );
    assert_eq!(ok.status, 201, "{}", String::from_utf8_lossy(&ok.body));

    for (method, action, route) in [
        ("DELETE", "", "/v1/profiles/{name}"),
        ("GET", "", "/v1/profiles/{name}"),
        ("PATCH", "", "/v1/profiles/{name}"),
        ("POST", "/start", "/v1/profiles/{name}/start"),
        ("POST", "/stop", "/v1/profiles/{name}/stop"),
        ("POST", "/suspend", "/v1/profiles/{name}/suspend"),
        ("POST", "/resume", "/v1/profiles/{name}/resume"),
        ("POST", "/switch", "/v1/profiles/{name}/switch"),
        ("GET", "/events", "/v1/profiles/{name}/events"),
        ("GET", "/screenshot", "/v1/profiles/{name}/screenshot"),
    ] {
        let body = (method == "PATCH").then(|| json!({"autostart": true}));
        for (name, want) in [("-x", 400), ("A", 400), ("ghost", 404)] {
            let url = format!("/v1/profiles/{name}{action}");
            let a = call(method, &url, route, body.clone());
            assert_eq!(a.status, want, "{method} {url}");
        }
    }
    // A method a path does not have: 405, the JSON error body, and what is allowed.
    for (method, url) in [("PUT", "/v1/profiles"), ("POST", "/v1/profiles/lab/events")] {
        let a = c.raw(method, url, None).unwrap();
        assert_eq!(a.status, 405, "{method} {url}");
        let e: handset::api_types::ErrorBody = serde_json::from_slice(&a.body).unwrap();
        assert!(e.error.contains("not allowed"), "{}", e.error);
    }
}

#[test]
fn the_validator_catches_mismatches() {
    let doc = doc();
    let schema = json!({"$ref": "#/components/schemas/Event"});
    let mut errs = vec![];
    let good = json!({"id": 1, "time_ms": 2, "profile": "a", "event": "x", "detail": ""});
    validate(&doc, &schema, &good, "$", &mut errs);
    assert!(errs.is_empty(), "{errs:?}");
    let bad = json!({"id": "1", "time_ms": 2, "profile": "a", "event": "x", "extra": 1});
    validate(&doc, &schema, &bad, "$", &mut errs);
    assert_eq!(errs.len(), 3, "{errs:?}"); // id type, detail missing, extra undocumented
}

/// `GET /v1/events/stream`: documented errors as JSON, new events as server-sent events, and
/// a stopping daemon ends the stream (its shutdown does not wait for the follower).
#[test]
fn the_event_stream_sends_new_events_and_ends_with_the_daemon() {
    use handset::client::ClientError;
    use std::sync::mpsc::{channel, RecvTimeoutError};
    use std::time::Duration;

    let d = InProcess::start();
    let c = Client::new(&d.socket);
    for (url, want) in [
        ("/v1/events/stream?after=x", 400),
        ("/v1/events/stream?profile=UPPER", 400),
        ("/v1/events/stream?profile=never-made", 404),
    ] {
        match c.stream_lines(url, |_| true) {
            Err(ClientError::Api { status, message }) => {
                assert_eq!(status, want, "{url}: {message}");
                assert!(!message.is_empty());
            }
            other => panic!("{url}: {other:?}"),
        }
    }
    let newest: Vec<handset::Event> = c.call("GET", "/v1/events?limit=1", None::<&()>).unwrap();
    let after = newest.last().map_or(0, |e| e.id);
    let (tx, rx) = channel::<String>();
    let follower = Client::new(&d.socket);
    std::thread::spawn(move || {
        let url = format!("/v1/events/stream?after={after}");
        let _ = follower.stream_lines(&url, |l| tx.send(l.to_string()).is_ok());
    });
    let a = c
        .raw(
            "POST",
            "/v1/profiles",
            Some(br#"{"name": "streamed", "template": "personal"}"#),
        )
        .unwrap();
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    let mut seen = Vec::new();
    let event = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("no event streamed ({e}); lines {seen:?}"));
        if let Some(data) = line.strip_prefix("data:") {
            let e: handset::Event = serde_json::from_str(data.trim()).unwrap();
            break e;
        }
        seen.push(line);
    };
    assert_eq!(
        (event.profile.as_str(), event.event.as_str()),
        ("streamed", "created")
    );
    assert!(event.id > after);
    assert!(seen.iter().any(|l| l == "event: lifecycle"), "{seen:?}");
    assert!(seen.contains(&format!("id: {}", event.id)), "{seen:?}");

    // The daemon stops with the follower attached: its stream ends, the stop completes.
    let (done_tx, done_rx) = channel();
    std::thread::spawn(move || {
        drop(d);
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the daemon's shutdown waited for the event stream");
    loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(_) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("the stream did not end"),
        }
    }
}
