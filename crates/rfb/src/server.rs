//! The server: an accept thread per listener and, per client, a reader thread (parses what
//! the client sends, turns keys and the pointer into virtio-input events, records update
//! requests) and a writer thread (waits for an update request and a flush of the guest's
//! screen, then sends the damaged areas). Nothing polls: the writer sleeps on its session's
//! condition variable, which the gpu's flushes and the reader wake.
//!
//! A client only ever hurts itself: a protocol error ends its session, a client that stops
//! reading is dropped when a write has waited [`WRITE_TIMEOUT`], and at most [`MAX_CLIENTS`]
//! sessions exist at once.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use devices::virtio::gpu::protocol::Rect;
use devices::virtio::gpu::{Display, FlushWatcher};
use devices::virtio::input::InputHandle;

use crate::copyrect::{rows_of, ClientFrame};
use crate::keysym::to_linux_key;
use crate::proto::{self, encoding, ClientMessage, PixelFormat, ProtoError, Version};
use crate::zrle::ZrleEncoder;

/// Most clients served at once; more are turned away.
pub const MAX_CLIENTS: usize = 16;
/// A client that takes longer than this to read one update is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that takes longer than this to finish the handshake is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// More damaged rectangles than this in one update are sent as their bounding box.
const MAX_RECTS: usize = 32;

/// What a VNC session shows and where its input goes.
#[derive(Clone)]
pub struct Screen {
    /// The gpu's scanout.
    pub display: Display,
    /// Where key events go, if anywhere.
    pub keyboard: Option<InputHandle>,
    /// Where pointer events go (as one finger), if anywhere.
    pub touch: Option<InputHandle>,
    /// The desktop name clients show.
    pub name: String,
}

/// A listening socket the server accepts clients on.
pub enum Listener {
    /// Loopback TCP.
    Tcp(TcpListener),
    /// A unix socket (the jailed VMM's, which the daemon exposes).
    Unix(UnixListener),
}

/// One client's connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

/// Accepts clients on `listener` on a new thread (named `vnc`) and serves each on its own
/// two threads. `on_thread` runs first on every thread the server starts (the jailed VMM
/// installs a seccomp filter there).
pub fn serve(listener: Listener, screen: Screen, on_thread: fn()) -> io::Result<()> {
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("vnc".into())
        .spawn(move || {
            on_thread();
            loop {
                let accepted = match &listener {
                    Listener::Tcp(l) => l.accept().map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        Stream::Tcp(s)
                    }),
                    Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
                };
                match accepted {
                    Ok(stream) => admit(stream, &screen, &clients, on_thread),
                    Err(e) => tracing::warn!("vnc: accept failed: {e}"),
                }
            }
        })?;
    Ok(())
}

/// Starts a session for `stream`, unless [`MAX_CLIENTS`] are being served.
fn admit(stream: Stream, screen: &Screen, clients: &Arc<AtomicUsize>, on_thread: fn()) {
    if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
        clients.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!("vnc: {MAX_CLIENTS} clients already; one turned away");
        return;
    }
    let screen = screen.clone();
    let count = clients.clone();
    let spawned = std::thread::Builder::new()
        .name("vnc-read".into())
        .spawn(move || {
            on_thread();
            if let Err(e) = run_session(stream, &screen, on_thread) {
                tracing::info!("vnc: session ended: {e}");
            }
            count.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        clients.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!("vnc: cannot start a session: {e}");
    }
}

/// An update the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UpdateRequest {
    incremental: bool,
    rect: Rect,
}

/// What the reader tells the writer.
struct SessionState {
    format: PixelFormat,
    desktop_size: bool,
    /// The client takes ZRLE (then the screen goes out in it rather than Raw).
    zrle: bool,
    /// The client takes CopyRect (then a scrolled area goes out as a copy and the new rows).
    copy_rect: bool,
    request: Option<UpdateRequest>,
    /// The guest flushed since the writer last looked.
    flushed: bool,
    closed: bool,
}

/// One client's shared state.
struct Session {
    state: Mutex<SessionState>,
    wake: Condvar,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }
}

impl FlushWatcher for Session {
    fn flushed(&self) {
        self.lock().flushed = true;
        self.wake.notify_all();
    }
}

/// The handshake, then the reader loop on this thread and the writer on another.
fn run_session(mut stream: Stream, screen: &Screen, on_thread: fn()) -> Result<(), SessionError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let size = handshake(&mut stream, screen)?;
    stream.set_read_timeout(None)?;
    let session = Arc::new(Session {
        state: Mutex::new(SessionState {
            format: PixelFormat::NATIVE,
            desktop_size: false,
            zrle: false,
            copy_rect: false,
            request: None,
            flushed: false,
            closed: false,
        }),
        wake: Condvar::new(),
    });
    let watcher: Arc<dyn FlushWatcher> = session.clone();
    screen
        .display
        .watch(Arc::downgrade(&watcher) as Weak<dyn FlushWatcher>);
    let writer = {
        let out = stream.try_clone()?;
        let session = session.clone();
        let display = screen.display.clone();
        std::thread::Builder::new()
            .name("vnc-write".into())
            .spawn(move || {
                on_thread();
                let mut out = out;
                if let Err(e) = write_updates(&mut out, &session, &display, size) {
                    tracing::debug!("vnc: writer: {e}");
                }
                session.close();
                out.shutdown();
            })?
    };
    let read = read_messages(&mut stream, &session, screen);
    session.close();
    stream.shutdown();
    let _ = writer.join();
    drop(watcher);
    read
}

/// Version, security (None) and initialisation; returns the size the client was told.
fn handshake(stream: &mut Stream, screen: &Screen) -> Result<(u32, u32), SessionError> {
    stream.write_all(proto::SERVER_VERSION)?;
    let mut line = [0u8; 12];
    stream.read_exact(&mut line)?;
    let version = proto::parse_version(&line)?;
    match version {
        Version::V3_3 => stream.write_all(&u32::from(proto::SECURITY_NONE).to_be_bytes())?,
        Version::V3_7 | Version::V3_8 => {
            stream.write_all(&[1, proto::SECURITY_NONE])?;
            let mut chosen = [0u8; 1];
            stream.read_exact(&mut chosen)?;
            if chosen[0] != proto::SECURITY_NONE {
                if version == Version::V3_8 {
                    let reason = b"only security type None is offered";
                    let mut failed = 1u32.to_be_bytes().to_vec();
                    let len = u32::try_from(reason.len()).unwrap_or(0);
                    failed.extend_from_slice(&len.to_be_bytes());
                    failed.extend_from_slice(reason);
                    stream.write_all(&failed)?;
                }
                return Err(ProtoError::BadSecurity(chosen[0]).into());
            }
            if version == Version::V3_8 {
                stream.write_all(&0u32.to_be_bytes())?;
            }
        }
    }
    let mut shared = [0u8; 1];
    stream.read_exact(&mut shared)?;
    let (w, h) = screen
        .display
        .scanout_size()
        .unwrap_or_else(|| screen.display.mode());
    let mut init = Vec::new();
    proto::server_init(clamp16(w), clamp16(h), &screen.name, &mut init);
    stream.write_all(&init)?;
    Ok((w, h))
}

fn clamp16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// Reads and carries out client messages until the client leaves or errs.
fn read_messages(
    stream: &mut Stream,
    session: &Session,
    screen: &Screen,
) -> Result<(), SessionError> {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut buttons = 0u8;
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        while let Some((msg, len)) = proto::parse_client_message(&pending[used..])? {
            used += len;
            handle_message(msg, session, screen, &mut buttons);
        }
        pending.drain(..used);
    }
}

fn handle_message(msg: ClientMessage, session: &Session, screen: &Screen, buttons: &mut u8) {
    match msg {
        ClientMessage::SetPixelFormat(pf) => session.lock().format = pf,
        ClientMessage::SetEncodings(list) => {
            let mut st = session.lock();
            st.desktop_size = list.contains(&encoding::DESKTOP_SIZE);
            st.zrle = list.contains(&crate::zrle::ZRLE);
            st.copy_rect = list.contains(&encoding::COPY_RECT);
        }
        ClientMessage::UpdateRequest {
            incremental,
            x,
            y,
            width,
            height,
        } => {
            let rect = Rect {
                x: u32::from(x),
                y: u32::from(y),
                width: u32::from(width),
                height: u32::from(height),
            };
            let mut st = session.lock();
            st.request = Some(match st.request {
                Some(old) => UpdateRequest {
                    incremental: old.incremental && incremental,
                    rect: old.rect.union(&rect),
                },
                None => UpdateRequest { incremental, rect },
            });
            drop(st);
            session.wake.notify_all();
        }
        ClientMessage::Key { down, keysym } => {
            if let (Some(kb), Some(code)) = (&screen.keyboard, to_linux_key(keysym)) {
                if let Err(e) = kb.key(code, down) {
                    tracing::debug!("vnc: key dropped: {e}");
                }
            }
        }
        ClientMessage::Pointer { buttons: now, x, y } => {
            let Some(touch) = &screen.touch else {
                return;
            };
            let was_down = *buttons & 1 != 0;
            let is_down = now & 1 != 0;
            *buttons = now;
            let sent = match (was_down, is_down) {
                (_, true) => touch.touch(0, u32::from(x), u32::from(y)),
                (true, false) => touch.release(0),
                (false, false) => Ok(()),
            };
            if let Err(e) = sent {
                tracing::debug!("vnc: pointer dropped: {e}");
            }
        }
        ClientMessage::CutText { .. } => {}
    }
}

/// Waits for requests and flushes and answers them until the session closes.
fn write_updates(
    out: &mut Stream,
    session: &Session,
    display: &Display,
    mut size: (u32, u32),
) -> Result<(), SessionError> {
    // (u64::MAX, 0) is no generation the device has: the first incremental request gets the
    // whole screen.
    let mut position = (u64::MAX, 0);
    let mut msg = Vec::new();
    // One zlib stream for the whole connection, as ZRLE clients expect.
    let mut zrle_stream = ZrleEncoder::new();
    // What the client holds, kept while it takes CopyRect (one frame of the screen's size).
    let mut client: Option<ClientFrame> = None;
    loop {
        let (request, format, desktop_size, zrle, copy_rect) = {
            let mut st = session.lock();
            loop {
                if st.closed {
                    return Ok(());
                }
                match st.request {
                    Some(r) if !r.incremental || st.flushed => break,
                    _ => {}
                }
                st = session.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.flushed = false;
            let request = st.request.take();
            (request, st.format, st.desktop_size, st.zrle, st.copy_rect)
        };
        let Some(request) = request else { continue };
        let damage = display.damage_since(position);
        position = damage.position;
        msg.clear();
        let sent = match display.scanout_size() {
            None if request.incremental => false,
            None => {
                // Nothing on the screen yet: black.
                let area = Rect::sized(size.0, size.1);
                let rect = request.rect.intersect(&area).unwrap_or(Rect::sized(0, 0));
                let black = vec![0u8; rect.width as usize * rect.height as usize * 3];
                proto::update_header(1, &mut msg);
                raw_rect(rect, &black, &format, &mut msg);
                true
            }
            Some(now) => {
                let resized = now != size && desktop_size;
                if resized {
                    size = now;
                }
                let area = Rect::sized(size.0.min(now.0), size.1.min(now.1));
                let wanted = if resized {
                    vec![area]
                } else if !request.incremental {
                    request.rect.intersect(&area).into_iter().collect()
                } else {
                    match damage.rects {
                        None => request.rect.intersect(&area).into_iter().collect(),
                        Some(rects) => clip_all(&rects, &request.rect, &area),
                    }
                };
                let zrle = zrle.then_some(&mut zrle_stream);
                if !copy_rect {
                    client = None;
                } else if resized || client.as_ref().is_none_or(|c| c.size() != size) {
                    client = Some(ClientFrame::new(size.0, size.1));
                }
                encode_update(
                    display,
                    &wanted,
                    resized.then_some(size),
                    &format,
                    (zrle, client.as_mut()),
                    &mut msg,
                )
            }
        };
        if sent {
            out.write_all(&msg)?;
        } else if !request.incremental {
            // A full update of an area off the screen: an empty update answers it.
            msg.clear();
            proto::update_header(0, &mut msg);
            out.write_all(&msg)?;
        } else {
            // Nothing to send yet: keep the request until the next flush.
            let mut st = session.lock();
            st.request.get_or_insert(request);
        }
    }
}

/// `rects` clipped to `request` and `area`, as their bounding box when there are many.
fn clip_all(rects: &[Rect], request: &Rect, area: &Rect) -> Vec<Rect> {
    let clipped: Vec<Rect> = rects
        .iter()
        .filter_map(|r| r.intersect(request)?.intersect(area))
        .filter(|r| !r.is_empty())
        .collect();
    if clipped.len() > MAX_RECTS {
        let all = clipped.iter().skip(1).fold(clipped[0], |a, r| a.union(r));
        vec![all]
    } else {
        clipped
    }
}

/// A FramebufferUpdate of `rects` in ZRLE through `zrle` when given, else Raw (after a
/// DesktopSize rectangle if `new_size`); with `client` (what a CopyRect client holds), a
/// rectangle whose content scrolled goes as a CopyRect and its new rows. False if there is
/// nothing to send.
fn encode_update(
    display: &Display,
    rects: &[Rect],
    new_size: Option<(u32, u32)>,
    format: &PixelFormat,
    (mut zrle, mut client): (Option<&mut ZrleEncoder>, Option<&mut ClientFrame>),
    msg: &mut Vec<u8>,
) -> bool {
    let mut body = Vec::new();
    let mut count = 0u16;
    if let Some((w, h)) = new_size {
        proto::rect_header(
            0,
            0,
            clamp16(w),
            clamp16(h),
            encoding::DESKTOP_SIZE,
            &mut body,
        );
        count += 1;
    }
    for r in rects.iter().filter(|r| !r.is_empty()) {
        let Some((rgb, _, _)) = display.read_rect(*r) else {
            continue;
        };
        let scroll = client.as_deref().and_then(|c| c.find_scroll(*r, &rgb));
        let (r, rgb) = match scroll {
            Some(s) => {
                proto::rect_header(
                    clamp16(s.copy.x),
                    clamp16(s.copy.y),
                    clamp16(s.copy.width),
                    clamp16(s.copy.height),
                    encoding::COPY_RECT,
                    &mut body,
                );
                body.extend_from_slice(&clamp16(s.copy.x).to_be_bytes());
                body.extend_from_slice(&clamp16(s.src_y).to_be_bytes());
                count += 1;
                if let Some(c) = client.as_deref_mut() {
                    c.apply_copy(s.copy, s.src_y);
                }
                let first = s.exposed.y - r.y;
                let new_rows = rows_of(&rgb, r.width, first, s.exposed.height).to_vec();
                (s.exposed, new_rows)
            }
            None => (*r, rgb),
        };
        if let Some(c) = client.as_deref_mut() {
            c.apply(r, &rgb);
        }
        match zrle.as_deref_mut() {
            Some(stream) => {
                let at = (
                    clamp16(r.x),
                    clamp16(r.y),
                    clamp16(r.width),
                    clamp16(r.height),
                );
                stream.rect(at, &rgb, format, &mut body);
            }
            None => raw_rect(r, &rgb, format, &mut body),
        }
        count += 1;
    }
    if count == 0 {
        return false;
    }
    proto::update_header(count, msg);
    msg.extend_from_slice(&body);
    true
}

/// One Raw rectangle.
fn raw_rect(r: Rect, rgb: &[u8], format: &PixelFormat, out: &mut Vec<u8>) {
    proto::rect_header(
        clamp16(r.x),
        clamp16(r.y),
        clamp16(r.width),
        clamp16(r.height),
        encoding::RAW,
        out,
    );
    format.encode(rgb, out);
}
