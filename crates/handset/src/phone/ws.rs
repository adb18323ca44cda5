//! `GET /v1/profiles/{name}/screen`: a running profile's screen as RFB over a websocket.
//!
//! The websocket's binary messages carry the bytes of an RFB 3.8 session with the profile's
//! VMM (its `run/vnc.sock`), as websockify does for noVNC: each message from the VMM is sent
//! as one binary message, and each binary message from the client is written to the VMM. A
//! text message ends the session (RFB is bytes). The session ends when either side closes,
//! or when the VMM ends (stop, suspend, crash). A client on another machine (the browser
//! phone bound wider than loopback) of a profile whose IT policy says `[screen] remote_view =
//! false` gets a screen the host draws instead (`rfb::notice`: a blank frame with a notice,
//! its input dropped); the VMM's socket is never opened for it, so no guest pixel reaches it.

use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::response::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::api::{ApiError, Peer};
use crate::daemon::Handset;
use crate::error::Error;

/// The largest message a client may send (RFB client messages are small; the VNC server
/// bounds cut text itself).
pub const CLIENT_MESSAGE_MAX: usize = 64 * 1024;
/// The most bytes of the VMM's RFB stream read into one message.
const CHUNK: usize = 64 * 1024;
/// Close code for a text message (RFC 6455 1003: unsupported data).
const UNSUPPORTED_DATA: u16 = 1003;

/// The handler: checks the profile (404, 409), the client's right to view (403) and the
/// upgrade request (426), connects to the VMM's VNC socket (500 if it does not answer), then
/// switches to the websocket.
pub async fn screen(
    State(h): State<Arc<Handset>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(name): Path<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let socket = h.vnc_socket(&name)?;
    let ws = ws.map_err(|e| {
        Error::UpgradeRequired(format!(
            "this route is a websocket (Connection: Upgrade, Upgrade: websocket): {e}"
        ))
    })?;
    if crate::lock::is_locked(h.dir(), &name) {
        h.audit(
            &name,
            "screen",
            &format!("{peer}: shown the lock notice (the profile is locked)"),
        );
        let display = h.display_size(&name)?;
        return Ok(ws
            .max_message_size(CLIENT_MESSAGE_MAX)
            .max_frame_size(CLIENT_MESSAGE_MAX)
            .on_upgrade(move |ws| notice(ws, display, name, &LOCK_NOTICE)));
    }
    if peer.is_remote() && !h.screen_rules(&name)?.remote_view {
        h.audit(
            &name,
            "screen",
            &format!("{peer}: shown the policy notice ([screen] remote_view = false)"),
        );
        let display = h.display_size(&name)?;
        return Ok(ws
            .max_message_size(CLIENT_MESSAGE_MAX)
            .max_frame_size(CLIENT_MESSAGE_MAX)
            .on_upgrade(move |ws| notice(ws, display, name, &NOTICE)));
    }
    let vmm = UnixStream::connect(&socket).await.map_err(|e| {
        Error::Vmm(format!(
            "profile {name}'s VMM is not serving its screen: {e}"
        ))
    })?;
    let dir = h.dir().clone();
    Ok(ws
        .max_message_size(CLIENT_MESSAGE_MAX)
        .max_frame_size(CLIENT_MESSAGE_MAX)
        .on_upgrade(move |ws| async move {
            // A lock ends the session (dropping both ends closes them).
            crate::daemon::view::until_locked(bridge(ws, vmm), &dir, &name).await;
        }))
}

/// The lines of the notice a forbidden remote viewer sees.
pub const NOTICE: [&str; 3] = ["SCREEN NOT SHOWN", "IT POLICY FORBIDS", "REMOTE VIEWING"];

/// The lines of the notice a locked profile's screen shows instead of its guest.
pub const LOCK_NOTICE: [&str; 3] = ["PROFILE LOCKED", "UNLOCK IT WITH", "ITS PASSCODE"];

/// Serves the host-drawn notice screen (`lines`) over the websocket until the viewer leaves
/// or errs.
async fn notice(
    mut ws: WebSocket,
    (width, height): (u16, u16),
    name: String,
    lines: &'static [&'static str; 3],
) {
    let mut session = rfb::notice::NoticeSession::new(width, height, &name, lines);
    let greeting = axum::body::Bytes::from_static(rfb::notice::NoticeSession::greeting());
    if ws.send(Message::Binary(greeting)).await.is_err() {
        return;
    }
    while let Some(Ok(msg)) = ws.recv().await {
        let Message::Binary(bytes) = msg else {
            if matches!(msg, Message::Ping(_) | Message::Pong(_)) {
                continue;
            }
            return;
        };
        match session.receive(&bytes) {
            Ok(out) if out.is_empty() => {}
            Ok(out) => {
                if ws.send(Message::Binary(out.into())).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::info!("screen notice for {name}: session ended: {e}");
                let _ = ws.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

/// Carries RFB bytes between the websocket and the VMM until either ends.
async fn bridge(mut ws: WebSocket, vmm: UnixStream) {
    let (mut from_vmm, mut to_vmm) = vmm.into_split();
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            read = from_vmm.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = ws.send(Message::Close(None)).await;
                    return;
                }
                Ok(n) => {
                    let bytes = axum::body::Bytes::copy_from_slice(&buf[..n]);
                    if ws.send(Message::Binary(bytes)).await.is_err() {
                        return;
                    }
                }
            },
            msg = ws.recv() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    if to_vmm.write_all(&bytes).await.is_err() {
                        let _ = ws.send(Message::Close(None)).await;
                        return;
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    let close = CloseFrame {
                        code: UNSUPPORTED_DATA,
                        reason: "RFB is carried in binary messages".into(),
                    };
                    let _ = ws.send(Message::Close(Some(close))).await;
                    return;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
            },
        }
    }
}
