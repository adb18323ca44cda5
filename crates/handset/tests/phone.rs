//! The browser phone's pieces through the daemon: a profile's screen as RFB over a websocket
//! (`GET /v1/profiles/NAME/screen`), read by a websocket client no one here wrote
//! (tungstenite); a viewer on another machine of a profile whose policy forbids remote viewing
//! gets the host's notice screen instead.

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{can_run_vms, wait_until, Daemon};
use handset::api_types::CreateProfile;
use handset::client::ClientError;
use handset::spec::ProfileSpec;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

const RGB: [u8; 3] = [0x2a, 0x9d, 0x8f];
const W: usize = 180;
const H: usize = 320;

/// An RFB byte stream read from a websocket's binary messages (split anywhere).
struct WsBytes<S: Read + Write = UnixStream> {
    ws: WebSocket<S>,
    pending: VecDeque<u8>,
}

impl<S: Read + Write> WsBytes<S> {
    fn read(&mut self, n: usize) -> Vec<u8> {
        while self.pending.len() < n {
            match self.ws.read().unwrap() {
                Message::Binary(b) => self.pending.extend(b.iter()),
                other => panic!("not RFB bytes: {other:?}"),
            }
        }
        self.pending.drain(..n).collect()
    }

    fn write(&mut self, bytes: &[u8]) {
        self.ws.send(Message::binary(bytes.to_vec())).unwrap();
    }
}

fn connect(d: &Daemon, name: &str) -> Result<WebSocket<UnixStream>, tungstenite::Error> {
    let sock = UnixStream::connect(d.dir.join("handset.sock")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let url = format!("ws://localhost/v1/profiles/{name}/screen");
    tungstenite::client(url, sock)
        .map(|(ws, _)| ws)
        .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => panic!("blocking socket"),
        })
}

/// The status of a refused upgrade.
fn refused(d: &Daemon, name: &str) -> u16 {
    match connect(d, name) {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        other => panic!("{name}: not refused: {:?}", other.map(|_| ())),
    }
}

#[test]
fn the_screen_websocket_carries_the_profiles_rfb_session() {
    if !can_run_vms("the_screen_websocket_carries_the_profiles_rfb_session") {
        return;
    }
    let d = Daemon::start("phone-ws");
    let spec = ProfileSpec::from_toml(
        "name = \"work\"\nkernel = \"probe\"\n\
         cmdline = \"pv.mode=screen pv.screen.rgb=2a9d8f pv.screen.ms=60000\"\n\
         memory_mib = 80\nscreen = true\ndisplay = { width = 180, height = 320 }\n",
    )
    .unwrap();
    let req = CreateProfile {
        spec: Some(spec),
        ..Default::default()
    };
    let _: handset::ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    d.create_probe("plain", 64, "");

    assert_eq!(refused(&d, "nobody"), 404);
    assert_eq!(refused(&d, "plain"), 409, "no screen");
    assert_eq!(refused(&d, "work"), 409, "not running");

    d.act("work", "start").unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || d
            .serial("work")
            .contains("PROBE screen frame n=1 why=full")),
        "the probe never drew: {}\n{}",
        d.serial("work"),
        d.log()
    );
    // Not a websocket upgrade: 426 with the JSON error.
    match d
        .client()
        .call::<serde_json::Value>("GET", "/v1/profiles/work/screen", None::<&()>)
    {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status, 426, "{message}");
            assert!(message.contains("websocket"), "{message}");
        }
        other => panic!("not refused: {other:?}"),
    }

    let mut rfb = WsBytes {
        ws: connect(&d, "work").unwrap(),
        pending: VecDeque::new(),
    };
    let frame = rfb_full_frame(&mut rfb);
    let corner = ((H - 1) * W + (W - 1)) * 3;
    assert_eq!(frame[corner..corner + 3], RGB, "the profile colour");
    assert_eq!(frame[(W - 1) * 3..W * 3], RGB.map(|c| c >> 1), "the header");
    // KeyEvent 'b' down and up: KEY_B (48) in the guest.
    for down in [1u8, 0] {
        rfb.write(&[4, down, 0, 0, 0, 0, 0, b'b']);
    }
    assert!(
        wait_until(Duration::from_secs(30), || d
            .serial("work")
            .contains("PROBE input key code=48 value=0")),
        "the key did not reach the guest: {}",
        d.serial("work")
    );

    // A text message is no RFB: the session is closed with 1003.
    let mut ws = connect(&d, "work").unwrap();
    ws.send(Message::text("hello")).unwrap();
    let close = loop {
        match ws.read() {
            Ok(Message::Close(c)) => break c,
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(close.map(|c| c.code), Some(CloseCode::Unsupported));

    // Stopping the profile ends the session.
    d.act("work", "stop").unwrap();
    let ended = loop {
        match rfb.ws.read() {
            Ok(Message::Close(_)) | Err(_) => break true,
            Ok(_) => continue,
        }
    };
    assert!(ended);
}

/// An RFB 3.8 handshake (security None) and one full update (Raw, 32-bit little-endian);
/// the frame as RGB.
fn rfb_full_frame<S: Read + Write>(s: &mut WsBytes<S>) -> Vec<u8> {
    assert_eq!(s.read(12), b"RFB 003.008\n");
    s.write(b"RFB 003.008\n");
    assert_eq!(s.read(2), [1, 1], "security None");
    s.write(&[1]);
    assert_eq!(s.read(4), [0; 4]);
    s.write(&[1]);
    let init = s.read(24);
    let size = |i: usize| usize::from(u16::from_be_bytes([init[i], init[i + 1]]));
    assert_eq!((size(0), size(2)), (W, H));
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
    s.read(usize::try_from(name_len).unwrap());
    let (w16, h16) = (u16::try_from(W).unwrap(), u16::try_from(H).unwrap());
    let mut req = vec![3, 0, 0, 0, 0, 0];
    req.extend_from_slice(&w16.to_be_bytes());
    req.extend_from_slice(&h16.to_be_bytes());
    s.write(&req);
    let head = s.read(16);
    assert_eq!(head[..4], [0, 0, 0, 1], "one rectangle");
    assert_eq!(head[12..16], [0, 0, 0, 0], "Raw");
    s.read(W * H * 4)
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

/// This machine's address on its default route (not loopback), if it has one.
fn non_loopback_address() -> Option<std::net::IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("192.0.2.1:9").ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn a_remote_viewer_of_a_profile_that_forbids_it_sees_the_notice_not_the_guest() {
    let name = "a_remote_viewer_of_a_profile_that_forbids_it_sees_the_notice_not_the_guest";
    if !can_run_vms(name) {
        return;
    }
    let Some(ip) = non_loopback_address() else {
        common::loud(&format!(
            "SKIP: {name}: this machine has no address besides loopback to be a remote viewer from"
        ));
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let pv = |args: &[&str]| {
        let out = Command::new(common::pv_bin()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "pocketvisor {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The organisation's key, and an HTTPS certificate for the wider address.
    let key = t.join("org.key");
    pv(&["policy", "keygen", "-o", key.to_str().unwrap()]);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let cert_key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![ip.to_string()])
        .unwrap()
        .signed_by(&cert_key, &ca, &ca_key)
        .unwrap();
    let (cert_file, key_file) = (t.join("cert.pem"), t.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, cert_key.serialize_pem()).unwrap();
    let d = Daemon::start_with(
        "phone-remote",
        &[
            "--org-key",
            &format!("{}.pub", key.display()),
            "--http",
            &format!("{ip}:0"),
            "--http-cert",
            cert_file.to_str().unwrap(),
            "--http-key",
            key_file.to_str().unwrap(),
        ],
    );
    let spec = ProfileSpec::from_toml(
        "name = \"work\"\nkernel = \"probe\"\n\
         cmdline = \"pv.mode=screen pv.screen.rgb=2a9d8f pv.screen.ms=60000\"\n\
         memory_mib = 80\nscreen = true\ndisplay = { width = 180, height = 320 }\n",
    )
    .unwrap();
    let req = CreateProfile {
        spec: Some(spec),
        ..Default::default()
    };
    let _: handset::ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    let doc = t.join("policy.toml");
    std::fs::write(
        &doc,
        format!(
            "version = 1\nissued_at = {}\nprofile = \"work\"\n[screen]\nremote_view = false\n",
            policy::unix_now() - 60
        ),
    )
    .unwrap();
    let signed = t.join("policy.pvpol");
    pv(&[
        "policy",
        "sign",
        "--key",
        key.to_str().unwrap(),
        doc.to_str().unwrap(),
        "-o",
        signed.to_str().unwrap(),
    ]);
    pv(&[
        "policy",
        "apply",
        "--state-dir",
        d.dir.to_str().unwrap(),
        signed.to_str().unwrap(),
    ]);
    d.act("work", "start").unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || d
            .serial("work")
            .contains("PROBE screen frame n=1 why=full")),
        "the probe never drew: {}",
        d.serial("work")
    );

    // The phone's address and token, then the screen over TLS from the non-loopback address.
    let info: handset::DaemonInfo = d.client().call("GET", "/v1/handset", None::<&()>).unwrap();
    let url = info.phone.expect("the phone listens");
    let rest = url.strip_prefix("https://").unwrap();
    let (addr, query) = rest.split_once("/phone?token=").unwrap();
    let token = query.split('&').next().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server = rustls::pki_types::ServerName::from(ip);
    let conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let tls = rustls::StreamOwned::new(conn, tcp);
    use tungstenite::client::IntoClientRequest;
    let mut request = format!("wss://{addr}/v1/profiles/work/screen")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tungstenite::client(request, tls)
        .map_err(|e| format!("{e:?}"))
        .expect("the upgrade is accepted (the notice is served, not a 403)");
    let mut rfb = WsBytes {
        ws,
        pending: VecDeque::new(),
    };
    let frame = rfb_full_frame(&mut rfb);
    let (mut text, mut other) = (0, 0);
    for px in frame.chunks_exact(3) {
        assert_ne!(px, RGB, "a guest pixel reached the remote viewer");
        match [px[0], px[1], px[2]] {
            rfb::notice::TEXT => text += 1,
            rfb::notice::BACKGROUND => {}
            _ => other += 1,
        }
    }
    assert_eq!(other, 0, "only the notice's two colours");
    assert!(text > 100, "the notice is drawn ({text} pixels)");
    // Its keys go nowhere: the guest sees no key.
    for down in [1u8, 0] {
        rfb.write(&[4, down, 0, 0, 0, 0, 0, b'b']);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !d.serial("work").contains("PROBE input key"),
        "{}",
        d.serial("work")
    );
    // The local screenshot still shows the guest; the audit log names the notice.
    let shot: serde_json::Value = d
        .client()
        .call("GET", "/v1/profiles/work/screenshot", None::<&()>)
        .unwrap();
    assert_eq!(shot["width"], 180, "{shot}");
    let audit: Vec<handset::Event> = d
        .client()
        .call("GET", "/v1/audit?limit=1000", None::<&()>)
        .unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.event == "screen" && e.detail.contains("shown the policy notice")),
        "{audit:?}"
    );
    d.act("work", "stop").unwrap();
}
