//! The MDM server over real TLS on loopback: enrollment, tokens, device certificates,
//! isolation between devices, signed commands and results, the admin token, long-poll; each
//! test on the SQLite and on the PostgreSQL store (`NAME::sqlite`, `NAME::postgres`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mdm::client::{Client, DeviceKey, Reply};
use mdm::protocol::Enrolled;
use mdm::server::{Mdm, TlsListener};
use mdm::sim::{SimDevice as Device, Target};
use mdm::Store;
use support::Backend;

const ADMIN: &str = "admin-secret";
const T: Duration = Duration::from_secs(60);

struct Server {
    addr: SocketAddr,
    ca_pem: String,
    store: Arc<dyn Store>,
    mdm: Arc<Mdm>,
    _dir: tempfile::TempDir,
    _backend: Option<Backend>,
}

/// A server on the store `backend` opens, its CA and command key in a new temp dir.
async fn start(backend: Backend) -> Server {
    let mut server = serve_store(backend.open()).await;
    server._backend = Some(backend);
    server
}

/// A server on `store`, its CA and command key in a new temp dir.
async fn serve_store(store: Arc<dyn Store>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    // Long polls held up to 120 s: the load test's polls must outlast its set-up under load.
    let mdm = Mdm::new(dir.path(), store.clone(), ADMIN, Duration::from_secs(120)).unwrap();
    let config = mdm.tls_config(&["localhost".to_string()]).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = TlsListener::new(tcp, config).unwrap();
    let ca_pem = mdm.ca_pem().to_owned();
    tokio::spawn(mdm::server::serve(
        mdm.clone(),
        listener,
        std::future::pending(),
    ));
    Server {
        addr,
        ca_pem,
        store,
        mdm,
        _dir: dir,
        _backend: None,
    }
}

impl Server {
    fn anon(&self) -> Client {
        Client::new(self.addr, "localhost", &self.ca_pem, None, T).unwrap()
    }
    async fn admin(&self, method: &str, path: &str, body: serde_json::Value) -> Reply {
        let b = body.to_string();
        let body = if body.is_null() {
            None
        } else {
            Some(b.as_bytes())
        };
        self.anon()
            .request(method, path, Some(ADMIN), body)
            .await
            .unwrap()
    }
    async fn token(&self) -> String {
        let r = self
            .admin(
                "POST",
                "/v1/admin/tokens",
                serde_json::json!({"ttl_secs": 600}),
            )
            .await;
        assert_eq!(r.status, 200);
        json(&r)["token"].as_str().unwrap().to_owned()
    }
    /// Where simulated devices connect.
    fn target(&self) -> Target {
        Target {
            addr: self.addr,
            name: "localhost".into(),
            ca_pem: self.ca_pem.clone(),
            timeout: T,
        }
    }
    async fn enroll(&self) -> Device {
        let token = self.token().await;
        Device::enroll(0, &self.target(), &token).await.unwrap()
    }
    async fn queue(&self, device: &str, kind: &str, body: &str) -> i64 {
        let r = self
            .admin(
                "POST",
                &format!("/v1/admin/devices/{device}/commands"),
                serde_json::json!({"kind": kind, "body": body}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        json(&r)["id"].as_i64().unwrap()
    }
}

#[derive(Debug)]
struct Unchecked(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Unchecked {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[allow(deprecated)]
fn stolen_cert_config(ca_pem: &str, cert_pem: &str, key: &DeviceKey) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let signer = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.pkcs8().to_vec(),
        )))
        .unwrap();
    let certified = Arc::new(rustls::sign::CertifiedKey::new(vec![cert], signer));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Unchecked(certified)));
    Arc::new(config)
}

fn json(r: &Reply) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

async fn post(c: &Client, path: &str, body: &impl serde::Serialize) -> Reply {
    c.request("POST", path, None, Some(&serde_json::to_vec(body).unwrap()))
        .await
        .unwrap()
}

async fn enrollment_issues_a_certificate_and_a_token_works_once(b: Backend) {
    let s = start(b).await;
    let token = s.token().await;
    let key = DeviceKey::generate().unwrap();
    let r = post(&s.anon(), "/v1/enroll", &key.enroll_body(&token)).await;
    assert_eq!(r.status, 200);
    let e: Enrolled = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(s.store.devices().unwrap()[0].id, e.device_id);
    // The same token again, even with a new key: refused.
    let again = post(
        &s.anon(),
        "/v1/enroll",
        &DeviceKey::generate().unwrap().enroll_body(&token),
    )
    .await;
    assert_eq!(again.status, 403);
    // An expired token: refused.
    s.store.add_token("old-token", 1).unwrap();
    let old = post(&s.anon(), "/v1/enroll", &key.enroll_body("old-token")).await;
    assert_eq!(old.status, 403);
    // A proof made for another token does not use this one up.
    let fresh = s.token().await;
    let mut wrong = key.enroll_body("something-else");
    wrong.token = fresh.clone();
    assert_eq!(post(&s.anon(), "/v1/enroll", &wrong).await.status, 400);
    assert_eq!(
        post(&s.anon(), "/v1/enroll", &key.enroll_body(&fresh))
            .await
            .status,
        200
    );
    assert_eq!(s.store.devices().unwrap().len(), 2);
}
on_both_stores!(async enrollment_issues_a_certificate_and_a_token_works_once);

/// Two devices enroll with one token at the same moment, over and over: each time exactly one
/// gets a certificate and the other is refused, and the store has one device per token.
async fn two_enrollments_racing_on_one_token_have_one_winner(b: Backend) {
    const ROUNDS: usize = 10;
    let s = start(b).await;
    for round in 0..ROUNDS {
        let token = s.token().await;
        let (first, second) = (
            DeviceKey::generate().unwrap(),
            DeviceKey::generate().unwrap(),
        );
        let (c1, c2) = (s.anon(), s.anon());
        let (body1, body2) = (first.enroll_body(&token), second.enroll_body(&token));
        let (r1, r2) = tokio::join!(
            post(&c1, "/v1/enroll", &body1),
            post(&c2, "/v1/enroll", &body2),
        );
        let mut statuses = [r1.status, r2.status];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 403], "round {round}");
        assert_eq!(s.store.devices().unwrap().len(), round + 1);
    }
}
on_both_stores!(async two_enrollments_racing_on_one_token_have_one_winner, flavor = "multi_thread", worker_threads = 2);

async fn device_endpoints_refuse_no_cert_a_revoked_one_and_a_stolen_one(b: Backend) {
    let b2 = b.another();
    let s = start(b).await;
    let a = s.enroll().await;
    let b = s.enroll().await;
    // Without a certificate.
    let r = s
        .anon()
        .request("GET", "/v1/device/commands", None, None)
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    // A's certificate with B's key (rustls' own client refuses to pair them, so a resolver
    // that does not check): the server's handshake refuses it.
    let stolen = Client::with_config(
        s.addr,
        "localhost",
        stolen_cert_config(&s.ca_pem, &a.enrolled.cert_pem, &b.key),
        T,
    )
    .unwrap();
    let r = stolen
        .request("GET", "/v1/device/commands", None, None)
        .await;
    assert!(r.as_ref().map_or(true, |r| r.status != 200), "{r:?}");
    assert!(r.is_err(), "the handshake must fail: {r:?}");
    // A certificate from another server's CA: refused in the handshake.
    let other = start(b2).await;
    let foreign = other.enroll().await;
    let cross = Client::new(
        s.addr,
        "localhost",
        &s.ca_pem,
        Some((&foreign.enrolled.cert_pem, &foreign.key)),
        T,
    )
    .unwrap();
    assert!(cross
        .request("GET", "/v1/device/commands", None, None)
        .await
        .is_err());
    // Revoked.
    assert_eq!(a.poll(0).await.unwrap().0, 200);
    let r = s
        .admin(
            "POST",
            &format!("/v1/admin/devices/{}/revoke", a.enrolled.device_id),
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(a.poll(0).await.unwrap().0, 403);
    assert_eq!(b.poll(0).await.unwrap().0, 200);
}
on_both_stores!(async device_endpoints_refuse_no_cert_a_revoked_one_and_a_stolen_one);

async fn a_device_sees_and_completes_only_its_own_commands(b: Backend) {
    let s = start(b).await;
    let a = s.enroll().await;
    let b = s.enroll().await;
    let id = s.queue(&a.enrolled.device_id, "lock", "{}").await;
    let (_, for_b) = b.poll(0).await.unwrap();
    assert!(for_b.is_empty());
    let (_, for_a) = a.poll(0).await.unwrap();
    assert_eq!(for_a.len(), 1);
    assert!(for_a[0].verify(&a.enrolled.command_key, &a.enrolled.device_id));
    // B posting a result for A's command, signed with B's key: not found for B.
    let sig = b.key.sign_result(&b.enrolled.device_id, id, "done");
    let r = post(
        &b.client,
        "/v1/device/results",
        &serde_json::json!({"command_id": id, "result": "done", "signature": sig}),
    )
    .await;
    assert_eq!(r.status, 404);
    // A result not signed by A's key: refused.
    let r = post(
        &a.client,
        "/v1/device/results",
        &serde_json::json!({"command_id": id, "result": "done", "signature": sig}),
    )
    .await;
    assert_eq!(r.status, 403);
    let sig = a.key.sign_result(&a.enrolled.device_id, id, "done");
    let r = post(
        &a.client,
        "/v1/device/results",
        &serde_json::json!({"command_id": id, "result": "done", "signature": sig}),
    )
    .await;
    assert_eq!(r.status, 204);
    assert!(a.poll(0).await.unwrap().1.is_empty());
}
on_both_stores!(async a_device_sees_and_completes_only_its_own_commands);

async fn a_command_altered_or_signed_by_another_key_does_not_verify(b: Backend) {
    let b2 = b.another();
    let s = start(b).await;
    let a = s.enroll().await;
    let b = s.enroll().await;
    s.queue(&a.enrolled.device_id, "policy", "v1").await;
    let cmd = a.poll(0).await.unwrap().1.remove(0);
    assert!(cmd.verify(&a.enrolled.command_key, &a.enrolled.device_id));
    let mut altered = cmd.clone();
    altered.kind = "wipe".into();
    assert!(!altered.verify(&a.enrolled.command_key, &a.enrolled.device_id));
    // For another device.
    assert!(!cmd.verify(&a.enrolled.command_key, &b.enrolled.device_id));
    // Another server's command key.
    let other = start(b2).await.enroll().await;
    assert!(!cmd.verify(&other.enrolled.command_key, &a.enrolled.device_id));
}
on_both_stores!(async a_command_altered_or_signed_by_another_key_does_not_verify);

async fn the_admin_api_needs_the_token_and_is_audited(b: Backend) {
    let s = start(b).await;
    let c = s.anon();
    for path in ["/v1/admin/devices", "/v1/admin/audit"] {
        assert_eq!(
            c.request("GET", path, None, None).await.unwrap().status,
            401
        );
        assert_eq!(
            c.request("GET", path, Some("wrong"), None)
                .await
                .unwrap()
                .status,
            401
        );
    }
    let r = c
        .request(
            "POST",
            "/v1/admin/tokens",
            None,
            Some(br#"{"ttl_secs":60}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let a = s.enroll().await;
    let r = s
        .admin(
            "POST",
            &format!("/v1/admin/devices/{}/commands", a.enrolled.device_id),
            serde_json::json!({"kind": "format-c"}),
        )
        .await;
    assert_eq!(r.status, 400);
    s.queue(&a.enrolled.device_id, "wipe", "").await;
    let log = json(
        &s.admin("GET", "/v1/admin/audit", serde_json::Value::Null)
            .await,
    );
    let actions: Vec<_> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["enroll-token", "enroll", "wipe"]);
}
on_both_stores!(async the_admin_api_needs_the_token_and_is_audited);

async fn a_long_poll_returns_when_a_command_is_queued(b: Backend) {
    let s = start(b).await;
    let a = s.enroll().await;
    let device = a.enrolled.device_id.clone();
    let started = Instant::now();
    let poll = tokio::spawn(async move { a.poll(30).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.queue(&device, "lock", "{}").await;
    let (status, cmds) = poll.await.unwrap();
    assert_eq!((status, cmds.len()), (200, 1));
    // Woken by the command, well before the 30 s wait (generous for a loaded machine).
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}
on_both_stores!(async a_long_poll_returns_when_a_command_is_queued);

/// Two servers on one PostgreSQL database, as a fleet runs them: a command queued (or a
/// revocation) through one wakes the long poll the other holds at once (NOTIFY between them),
/// not at the poll's deadline 60 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_queued_through_another_server_wakes_the_poll_at_once() {
    let Some(b) = Backend::postgres("fleet_wake") else {
        return;
    };
    let a = start(b).await;
    let other = serve_store(a._backend.as_ref().unwrap().open()).await;
    for round in 0..3 {
        let device = a.enroll().await;
        let id = device.enrolled.device_id.clone();
        let t0 = Instant::now();
        let poll = tokio::spawn(async move { device.poll(60).await.unwrap() });
        while a.mdm.polls_open() == 0 {
            assert!(
                !poll.is_finished() && t0.elapsed() < Duration::from_secs(60),
                "round {round}: the poll was never held"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let waited = if round < 2 {
            let command = other.queue(&id, "lock", "").await;
            let (status, commands) = poll.await.unwrap();
            assert_eq!(status, 200);
            assert_eq!(commands.len(), 1, "round {round}");
            assert_eq!(commands[0].id, command);
            t0.elapsed()
        } else {
            let r = other
                .admin(
                    "POST",
                    &format!("/v1/admin/devices/{id}/revoke"),
                    serde_json::Value::Null,
                )
                .await;
            assert_eq!(r.status, 204);
            let (status, _) = poll.await.unwrap();
            assert_eq!(status, 403, "the revoked device's poll");
            t0.elapsed()
        };
        assert!(
            waited < Duration::from_secs(20),
            "round {round}: the poll returned after {waited:?}"
        );
    }
}

async fn compliance_reports_reach_the_device_list(b: Backend) {
    let s = start(b).await;
    let a = s.enroll().await;
    let r = post(
        &a.client,
        "/v1/device/compliance",
        &serde_json::json!({"profiles": {"work": {"policy_version": 3}}}),
    )
    .await;
    assert_eq!(r.status, 204);
    let list = json(
        &s.admin("GET", "/v1/admin/devices", serde_json::Value::Null)
            .await,
    );
    assert_eq!(
        list[0]["compliance"]["profiles"]["work"]["policy_version"],
        3
    );
}
on_both_stores!(async compliance_reports_reach_the_device_list);

/// N devices (1000 unless MDM_LOAD_DEVICES says otherwise) enroll, all long-poll at once,
/// then each gets one command: every device receives exactly its own, within a bound
/// generous for a debug build at load 10. The devices are `mdm::sim`'s, as the bench's are.
async fn load_many_devices_polling(b: Backend) {
    // Each store's run opens N device connections (what the fd limit allows for one run):
    // the two run one after the other (both at once broke pipes in CI).
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    let wanted: usize = std::env::var("MDM_LOAD_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let n = mdm::sim::devices_the_fd_limit_allows(wanted).unwrap();
    if n < wanted {
        eprintln!("RLIMIT_NOFILE's hard limit: {n} devices instead of {wanted}");
    }
    assert!(n >= 100, "too few descriptors for a meaningful load test");
    let s = Arc::new(start(b).await);
    let tokens: Vec<String> = (0..n).map(|i| format!("load-{i}")).collect();
    for t in &tokens {
        s.store.add_token(t, i64::MAX).unwrap();
    }
    let started = Instant::now();
    // A thousand connections at once on a loaded 2-core machine: a device whose connection
    // failed before the server answered tries again (mdm::sim, as the handset's link does).
    let target = Target {
        timeout: Duration::from_secs(180),
        ..s.target()
    };
    let devices = mdm::sim::enroll_all(&target, &tokens).await.unwrap();
    let enrolled = started.elapsed();
    let retries: u32 = devices.iter().map(|d| d.retries).sum();
    let polling = Instant::now();
    let mut polls = tokio::task::JoinSet::new();
    for d in devices {
        polls.spawn(async move {
            let (status, cmds) = d.poll(120).await.unwrap();
            (d.enrolled.device_id, d.enrolled.command_key, status, cmds)
        });
    }
    // Every poll held by the server, then one command queued per device.
    let t0 = Instant::now();
    while s.mdm.polls_open() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{} of {n} polls open after 120 s",
            s.mdm.polls_open()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for d in s.store.devices().unwrap() {
        s.store.enqueue(&d.id, "lock", &d.id, 0).unwrap();
    }
    let queue = s.anon();
    let admin_path = |id: &str| format!("/v1/admin/devices/{id}/commands");
    // One admin request per device wakes its poll (the store insert alone does not).
    for d in s.store.devices().unwrap() {
        let r = queue
            .request(
                "POST",
                &admin_path(&d.id),
                Some(ADMIN),
                Some(br#"{"kind":"unlock"}"#),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let mut got = 0;
    while let Some(done) = polls.join_next().await {
        let (id, key, status, cmds) = done.unwrap();
        assert_eq!(status, 200);
        assert!(!cmds.is_empty(), "device {id} got nothing");
        assert!(cmds
            .iter()
            .all(|c| c.device_id == id && c.verify(&key, &id)));
        assert_eq!(cmds[0].body, id, "another device's command");
        got += 1;
    }
    assert_eq!(got, n);
    assert_eq!(s.mdm.polls_open(), 0);
    eprintln!(
        "{n} devices: enrolled in {enrolled:?} ({retries} connections retried), all polls \
         answered {:?} after they started",
        polling.elapsed()
    );
    assert!(polling.elapsed() < Duration::from_secs(300));
}
on_both_stores!(async load_many_devices_polling, flavor = "multi_thread", worker_threads = 2);

/// Every route and method docs/api/mdm.openapi.yaml lists is one the server has (not 404
/// or 405), and the server has no route the file does not list.
#[tokio::test]
async fn the_openapi_file_matches_the_routes() {
    // The routes do not depend on the store: SQLite only.
    let b = Backend::sqlite();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/api/mdm.openapi.yaml"
    ))
    .unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let s = start(b).await;
    let c = s.anon();
    let mut listed = Vec::new();
    for (path, ops) in doc["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap();
        for method in ops.as_mapping().unwrap().keys() {
            let method = method.as_str().unwrap().to_uppercase();
            let url = path.replace("{id}", "x");
            let body = (method == "POST").then_some(&b"{}"[..]);
            let r = c.request(&method, &url, None, body).await.unwrap();
            assert!(
                ![404, 405].contains(&r.status),
                "{method} {path}: {}",
                r.status
            );
            listed.push(format!("{method} {path}"));
        }
    }
    listed.sort();
    let mut served = vec![
        "POST /v1/enroll",
        "GET /v1/device/commands",
        "POST /v1/device/results",
        "POST /v1/device/compliance",
        "POST /v1/device/lease",
        "POST /v1/admin/tokens",
        "GET /v1/admin/devices",
        "POST /v1/admin/devices/{id}/commands",
        "POST /v1/admin/devices/{id}/revoke",
        "GET /v1/admin/audit",
    ];
    served.sort();
    assert_eq!(listed, served);
    // And a route not listed is not served.
    assert_eq!(
        c.request("GET", "/v1/admin/secrets", Some(ADMIN), None)
            .await
            .unwrap()
            .status,
        404
    );
}

async fn a_lease_is_signed_for_its_device_bounded_and_refused_once_revoked(b: Backend) {
    let s = start(b).await;
    let a = s.enroll().await;
    let b = s.enroll().await;
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let r = post(
        &a.client,
        "/v1/device/lease",
        &serde_json::json!({"secs": 60}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let lease: mdm::protocol::Lease = serde_json::from_slice(&r.body).unwrap();
    assert!(lease.verify(&a.enrolled.command_key, &a.enrolled.device_id));
    assert!(
        (t0 + 60..t0 + 120).contains(&lease.valid_until),
        "{lease:?}"
    );
    assert_eq!(lease.valid_until - lease.issued_at, 60, "{lease:?}");
    // Not for another device, not once changed (its end, or its time of contact, which an
    // offline limit runs from).
    assert!(!lease.verify(&a.enrolled.command_key, &b.enrolled.device_id));
    let mut longer = lease.clone();
    longer.valid_until += 3600;
    assert!(!longer.verify(&a.enrolled.command_key, &a.enrolled.device_id));
    let mut later = lease.clone();
    later.issued_at += 3600;
    assert!(!later.verify(&a.enrolled.command_key, &a.enrolled.device_id));
    for secs in [0, mdm::protocol::MAX_LEASE_SECS + 1] {
        let r = post(
            &a.client,
            "/v1/device/lease",
            &serde_json::json!({ "secs": secs }),
        )
        .await;
        assert_eq!(r.status, 400, "{secs}");
    }
    let r = post(
        &s.anon(),
        "/v1/device/lease",
        &serde_json::json!({"secs": 60}),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = s
        .admin(
            "POST",
            &format!("/v1/admin/devices/{}/revoke", a.enrolled.device_id),
            serde_json::Value::Null,
        )
        .await;
    assert_eq!(r.status, 204);
    let r = post(
        &a.client,
        "/v1/device/lease",
        &serde_json::json!({"secs": 60}),
    )
    .await;
    assert_eq!(r.status, 403);
}
on_both_stores!(async a_lease_is_signed_for_its_device_bounded_and_refused_once_revoked);
