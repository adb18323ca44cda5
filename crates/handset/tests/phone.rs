//! The browser phone's pieces through the daemon: a profile's screen as RFB over a websocket
//! (`GET /v1/profiles/NAME/screen`), read by a websocket client no one here wrote
//! (tungstenite).

mod common;

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
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
struct WsBytes {
    ws: WebSocket<UnixStream>,
    pending: VecDeque<u8>,
}

impl WsBytes {
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
fn rfb_full_frame(s: &mut WsBytes) -> Vec<u8> {
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
