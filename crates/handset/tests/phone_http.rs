//! The browser phone's listener, over plain HTTP on loopback and over HTTPS: the page and
//! the API routes it calls need the daemon's token, other routes are not served, another
//! origin is refused, and a wider address without a certificate is refused at start. No VM
//! is needed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{pv_bin, Daemon};

/// An HTTP answer: status, head (lower-cased names), body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }
}

/// One request (`Connection: close`) on `stream`.
fn exchange(
    mut stream: impl Read + Write,
    host: &str,
    method: &str,
    path: &str,
    extra: &[String],
) -> Answer {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A TLS peer that closes without close_notify: what arrived is the answer.
            Err(_) if !raw.is_empty() => break,
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no HTTP answer: {text}"));
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// The phone's (address, token) from `GET /v1/handset`.
fn phone(d: &Daemon, scheme: &str) -> (String, String) {
    let info: handset::DaemonInfo = d.client().call("GET", "/v1/handset", None::<&()>).unwrap();
    let url = info.phone.expect("the phone listens by default");
    let rest = url
        .strip_prefix(&format!("{scheme}://"))
        .unwrap_or_else(|| panic!("not {scheme}: {url}"));
    let (addr, query) = rest.split_once("/phone?token=").unwrap();
    (addr.to_string(), query.to_string())
}

#[test]
fn the_phone_needs_its_token_and_serves_only_its_routes() {
    let d = Daemon::start("phone-http");
    d.create_probe("plain", 64, "");
    let (addr, token) = phone(&d, "http");
    assert!(
        addr.starts_with("127.0.0.1:"),
        "loopback by default: {addr}"
    );
    let port = addr.rsplit(':').next().unwrap().to_string();
    let ask = |method: &str, path: &str, extra: &[String]| {
        let s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        exchange(s, &addr, method, path, extra)
    };
    let bearer = format!("Authorization: Bearer {token}");

    let root = ask("GET", "/", &[]);
    assert_eq!(root.status, 303);
    assert_eq!(root.header("location"), Some("/phone"));
    assert_eq!(ask("GET", "/phone", &[]).status, 401, "no token");
    let wrong = "0".repeat(token.len());
    assert_eq!(
        ask("GET", &format!("/phone?token={wrong}"), &[]).status,
        401
    );

    // The token becomes a cookie and leaves the address.
    let login = ask("GET", &format!("/phone?token={token}"), &[]);
    assert_eq!(login.status, 303);
    assert_eq!(login.header("location"), Some("/phone"));
    let cookie = login.header("set-cookie").unwrap().to_string();
    assert!(
        cookie.starts_with(&format!("pv_phone_{port}={token};"))
            && cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && !cookie.contains("Secure"),
        "{cookie}"
    );
    let jar = format!("Cookie: {}", cookie.split(';').next().unwrap());
    let page = ask("GET", "/phone", std::slice::from_ref(&jar));
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<canvas id=\"screen\""), "{}", page.body);
    assert!(page.header("content-security-policy").is_some());
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    let js = ask("GET", "/phone/phone.js", &[]);
    assert_eq!(js.status, 200);
    assert!(js.body.contains("class RfbSession"));
    assert_eq!(ask("GET", "/phone/other.js", &[]).status, 404);

    // The API routes the page calls: only with the token.
    let anon = ask("GET", "/v1/profiles", &[]);
    assert_eq!(anon.status, 401);
    assert!(anon.body.contains("\"error\""), "{}", anon.body);
    let list = ask("GET", "/v1/profiles", std::slice::from_ref(&bearer));
    assert_eq!(list.status, 200, "{}", list.body);
    let profiles: Vec<handset::ProfileInfo> = serde_json::from_str(&list.body).unwrap();
    assert_eq!(profiles.len(), 1);
    let with_cookie = ask("GET", "/v1/handset", std::slice::from_ref(&jar));
    assert_eq!(with_cookie.status, 200, "{}", with_cookie.body);

    // Routes the page does not call are not there, even with the token.
    let start = ask(
        "POST",
        "/v1/profiles/plain/start",
        std::slice::from_ref(&bearer),
    );
    assert_eq!(start.status, 404, "{}", start.body);
    let delete = ask(
        "DELETE",
        "/v1/profiles/plain",
        std::slice::from_ref(&bearer),
    );
    assert!(matches!(delete.status, 404 | 405), "{}", delete.body);
    let policy = ask("POST", "/v1/policies", std::slice::from_ref(&bearer));
    assert_eq!(policy.status, 404, "{}", policy.body);
    assert_eq!(d.show("plain").state, handset::ProfileState::Stopped);
    assert_eq!(d.show_all_names(), ["plain"]);

    // Another site's page cannot drive the phone, with the cookie or not.
    let evil = [jar.clone(), "Origin: http://evil.example".to_string()];
    let switch = ask("POST", "/v1/profiles/plain/switch", &evil);
    assert_eq!(switch.status, 403, "{}", switch.body);
    let ours = [jar, format!("Origin: http://{addr}")];
    let switch = ask("POST", "/v1/profiles/plain/switch", &ours);
    assert!(!matches!(switch.status, 401 | 403), "{}", switch.body);
}

#[test]
fn a_wider_phone_needs_https() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    for (http, says) in [("0.0.0.0:0", "needs HTTPS"), ("localhost", "not IP:PORT")] {
        let out = Command::new(pv_bin())
            .args(["handset", "--state-dir"])
            .arg(&state)
            .args(["--http", http])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--http {http} was accepted");
        assert!(err.contains(says), "--http {http}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
    }

    // A certificate authority and a certificate for 127.0.0.1 (rcgen).
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let (cert_file, key_file) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let d = Daemon::start_with(
        "phone-tls",
        &[
            "--http",
            "127.0.0.1:0",
            "--http-cert",
            cert_file.to_str().unwrap(),
            "--http-key",
            key_file.to_str().unwrap(),
        ],
    );
    let (addr, token) = phone(&d, "https");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let login = exchange(
        rustls::StreamOwned::new(conn, tcp),
        &addr,
        "GET",
        &format!("/phone?token={token}"),
        &[],
    );
    assert_eq!(login.status, 303);
    let cookie = login.header("set-cookie").unwrap();
    assert!(
        cookie.ends_with("; Secure"),
        "HTTPS cookies are Secure: {cookie}"
    );

    // Plain HTTP on the HTTPS port gets no page.
    let mut plain = TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    plain
        .write_all(format!("GET /phone?token={token} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("303"),
        "plain HTTP was answered"
    );
}
