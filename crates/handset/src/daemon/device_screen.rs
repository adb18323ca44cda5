//! The device screen over VNC: what the handset's own screen shows, the foreground profile's
//! frame under a status bar only the host draws (`display::Compositor`), on a loopback TCP port
//! opened on the first `device view` and kept while the daemon runs.
//!
//! One compositor thread follows the foreground: it reads the foreground profile's screen as
//! an RFB client of its VMM's `run/vnc.sock` (`display::RfbSource`; the VMM's `Display` handle
//! is in the jailed process, the socket is what the daemon reaches) and publishes each composed
//! frame. Each viewer (at most [`MAX_VIEWERS`]) gets a thread running a host-side RFB session
//! over those frames (`rfb::notice::NoticeSession::show`); its keys and pointer go to the
//! foreground profile through an RFB session of their own on its VMM's socket ([`InputSink`]),
//! the pointer moved up by the bar's rows (a touch on the bar reaches no guest).
//!
//! A locked foreground profile (`profile lock`) shows only the bar: its frame is not read and
//! input does not reach it.
//!
//! An offloaded profile in front (`profile switch` to it, or the offload of the profile in
//! front) is read the same way: its `run/vnc.sock` is then the relay to its twin's screen at
//! the cloud host (`cloud_screen`), and the device's keys and touches go there. The relay
//! carries what the twin's guest controls: `RfbSource` checks every size and rectangle, a
//! stream that breaks the protocol blanks the frame below the bar and is opened again, and a
//! socket that is not there yet (the relay connecting, a returned VMM starting) is tried
//! again until the profile's own VMM or relay answers.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;

use display::{Compositor, Foreground, Frame, RfbSource};
use rfb::proto::ClientMessage;

use super::Handset;
use crate::error::{Error, Result};

/// How long a read from the foreground's VMM may wait before the thread looks at the
/// foreground again (an idle screen sends nothing; the session is then opened again).
const SOURCE_WAIT: Duration = Duration::from_secs(1);
/// The wait before the foreground's screen socket is tried again after a session that could
/// not be opened or ended by itself (a switch does not wait).
const SOURCE_RETRY: Duration = Duration::from_millis(50);
/// Viewers of the device screen at once (each has a thread); more are turned away.
const MAX_VIEWERS: usize = 8;
/// Status bar height for a screen `width` pixels wide: about 1/18 of it, at least 12 rows.
fn bar_rows(width: usize) -> usize {
    (width / 18).max(12)
}

/// The latest composed frame and a count that grows with each one; each viewer's thread is
/// woken at once by a new frame (no polling).
#[derive(Default)]
struct Published {
    frame: Mutex<Option<(u64, Frame)>>,
    viewers: Mutex<Vec<mpsc::Sender<ViewerEvent>>>,
}

impl Published {
    fn publish(&self, frame: Frame) {
        let mut slot = self.frame.lock().unwrap_or_else(|e| e.into_inner());
        let generation = slot.as_ref().map_or(0, |(g, _)| g + 1);
        *slot = Some((generation, frame));
        drop(slot);
        // A viewer that is gone dropped its receiver: its sender goes.
        self.viewers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|tx| tx.send(ViewerEvent::Frame).is_ok());
    }

    fn latest(&self) -> Option<(u64, Frame)> {
        self.frame.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Wakes `tx` at every frame published from now on.
    fn subscribe(&self, tx: mpsc::Sender<ViewerEvent>) {
        self.viewers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
    }
}

/// What wakes a viewer's thread: a new frame, bytes from its client, or its client's end.
enum ViewerEvent {
    Frame,
    Client(Vec<u8>),
    Closed(std::io::Result<()>),
}

/// The device screen's listener, once opened.
#[derive(Default)]
pub struct DeviceScreen {
    addr: Mutex<Option<SocketAddr>>,
    /// The compositor's session with the foreground profile's VMM, while it reads one.
    reading: Arc<Mutex<Option<UnixStream>>>,
}

impl DeviceScreen {
    /// Ends the compositor's read of the old foreground at once (a switch), instead of when its
    /// next update or [`SOURCE_WAIT`] comes, so the new foreground's frame follows within
    /// milliseconds.
    pub fn nudge(&self) {
        let reading = self
            .reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(stream) = reading {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Where the device screen can be viewed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceViewInfo {
    /// The VNC (RFB 3.8, security None) address on loopback, `127.0.0.1:PORT`.
    pub vnc: String,
    /// The screen's size: the first foreground profile's display plus the status bar.
    pub width: u16,
    /// Height in pixels, the status bar's rows included.
    pub height: u16,
}

impl Handset {
    /// The loopback VNC address of the device screen (opened on first use, sized for the
    /// foreground profile's display then; 409 while no profile with a screen is in front).
    pub fn device_view(self: &Arc<Self>) -> Result<DeviceViewInfo> {
        let mut addr = self
            .device_screen
            .addr
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let fg = self
            .current_foreground()?
            .ok_or_else(|| Error::Conflict("no profile is in the foreground".into()))?;
        let (w, h) = self.display_size(&fg)?;
        let bar = bar_rows(usize::from(w));
        let height = u16::try_from(usize::from(h) + bar)
            .map_err(|_| Error::Conflict(format!("{fg}'s display is too tall")))?;
        if let Some(addr) = *addr {
            return Ok(DeviceViewInfo {
                vnc: addr.to_string(),
                width: w,
                height,
            });
        }
        if !self.registry.spec(&fg)?.screen {
            return Err(Error::Conflict(format!(
                "{fg} is in the foreground and has no screen (screen = true in its spec)"
            )));
        }
        let compositor = Compositor::new(usize::from(w), usize::from(height), bar)
            .map_err(|e| Error::Conflict(format!("device screen: {e}")))?;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| Error::Internal(format!("cannot listen for the device screen: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Internal(format!("device screen address: {e}")))?;
        let published = Arc::new(Published::default());
        published.publish(compositor.compose());
        let weak = Arc::downgrade(self);
        let p = published.clone();
        let reading = self.device_screen.reading.clone();
        std::thread::Builder::new()
            .name("device-screen".into())
            .spawn(move || follow_foreground(weak, compositor, &p, &reading))
            .map_err(|e| Error::Internal(format!("device screen thread: {e}")))?;
        let sink = Arc::new(InputSink {
            handset: Arc::downgrade(self),
            bar_rows: u16::try_from(bar).unwrap_or(u16::MAX),
            session: Mutex::new(None),
        });
        std::thread::Builder::new()
            .name("device-view".into())
            .spawn(move || accept(listener, published, sink))
            .map_err(|e| Error::Internal(format!("device view thread: {e}")))?;
        *addr = Some(local);
        Ok(DeviceViewInfo {
            vnc: local.to_string(),
            width: w,
            height,
        })
    }
}

/// Composes the device screen while the daemon lives: the foreground's bar, and its frame
/// read from its VMM's VNC socket (an offloaded profile's: the relay to its twin's).
fn follow_foreground(
    handset: Weak<Handset>,
    mut compositor: Compositor,
    published: &Published,
    reading: &Mutex<Option<UnixStream>>,
) {
    // Sessions in a row that gave no frame (of the profile in front).
    let mut failures = 0u32;
    loop {
        let Some(h) = handset.upgrade() else {
            return;
        };
        let fg = h.current_foreground().ok().flatten();
        let socket = fg.as_deref().and_then(|n| h.vnc_socket(n).ok());
        drop(h);
        let Some(name) = fg else {
            std::thread::sleep(SOURCE_WAIT);
            continue;
        };
        let since = std::time::Instant::now();
        let changed = compositor.foreground().map(|f| f.name.as_str()) != Some(name.as_str());
        compositor.switch(Foreground {
            colour: display::profile_colour(&name),
            name: name.clone(),
        });
        if changed {
            failures = 0;
            published.publish(compositor.compose());
            tracing::debug!(
                "device screen: {name} in front, its bar published in {:?}",
                since.elapsed()
            );
        }
        if is_locked(&handset, &name) {
            // The bar only: nothing of a locked profile's screen is read or kept.
            if compositor.clear_frame() {
                published.publish(compositor.compose());
            }
            std::thread::sleep(SOURCE_WAIT);
            continue;
        }
        let mut framed = false;
        let read = match socket {
            Some(socket) => {
                let read = read_profile(
                    &handset,
                    &name,
                    &socket,
                    &mut compositor,
                    published,
                    reading,
                    &mut framed,
                );
                *reading.lock().unwrap_or_else(|e| e.into_inner()) = None;
                read
            }
            None => Ok(()),
        };
        failures = if framed {
            0
        } else {
            failures.saturating_add(1)
        };
        if let Err(e) = &read {
            tracing::debug!("device screen: {name}'s screen: {e}");
        }
        // What a server that broke the protocol showed is not kept, nor a frame no session
        // has confirmed for a while (the VMM or the twin's relay gone or not there yet).
        let stale = failures >= STALE_AFTER;
        if (stale || read.as_ref().is_err_and(is_bad_stream)) && compositor.clear_frame() {
            published.publish(compositor.compose());
        }
        // A switch ended the read on purpose: the new foreground at once. Otherwise (a VMM
        // or relay that refused, went away or is not there yet) not a busy loop, and longer
        // waits while it stays so (a relay connects to the cloud host for every session).
        let switched = handset.upgrade().is_some_and(|h| {
            h.current_foreground().ok().flatten().as_deref() != Some(name.as_str())
        });
        if !switched {
            std::thread::sleep(retry_wait(failures));
        }
    }
}

/// Sessions in a row without a frame after which the frame shown is dropped (about 1.5 s
/// of waits).
const STALE_AFTER: u32 = 6;

/// The wait before the next session after `failures` in a row without a frame:
/// [`SOURCE_RETRY`], doubled with each failure up to 32 times that (1.6 s).
fn retry_wait(failures: u32) -> Duration {
    SOURCE_RETRY * (1u32 << failures.saturating_sub(1).min(5))
}

/// Whether a read of a profile's screen ended on what its server sent (out of bounds, not
/// RFB, refused), rather than on the socket (absent, closed, idle).
fn is_bad_stream(e: &display::SourceError) -> bool {
    !matches!(e, display::SourceError::Io(_))
}

/// Reads `name`'s screen into the device screen until it leaves the foreground or its
/// session ends; `framed` is set once a frame of it was published.
fn read_profile(
    handset: &Weak<Handset>,
    name: &str,
    socket: &std::path::Path,
    compositor: &mut Compositor,
    published: &Published,
    reading: &Mutex<Option<UnixStream>>,
    framed: &mut bool,
) -> std::result::Result<(), display::SourceError> {
    let since = std::time::Instant::now();
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(SOURCE_WAIT))?;
    *reading.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream.try_clone()?);
    let mut source = RfbSource::connect(stream)?;
    let connected = since.elapsed();
    loop {
        source.update(*framed)?;
        compositor.set_frame(source.frame());
        published.publish(compositor.compose());
        if !*framed {
            tracing::debug!(
                "device screen: {name}'s first frame published {:?} after connecting \
                 (session open in {connected:?})",
                since.elapsed()
            );
        }
        *framed = true;
        let Some(h) = handset.upgrade() else {
            return Ok(());
        };
        if h.current_foreground().ok().flatten().as_deref() != Some(name)
            || crate::lock::is_locked(h.dir(), name)
        {
            return Ok(());
        }
    }
}

fn is_locked(handset: &Weak<Handset>, name: &str) -> bool {
    handset
        .upgrade()
        .is_some_and(|h| crate::lock::is_locked(h.dir(), name))
}

/// Where the viewers' keys and pointer go: the foreground profile's VMM, through an RFB session
/// of the sink's own on its VNC socket (opened on the first event, again after a switch; it
/// never asks for frames).
struct InputSink {
    handset: Weak<Handset>,
    bar_rows: u16,
    session: Mutex<Option<(String, RfbSource<UnixStream>)>>,
}

impl InputSink {
    /// Passes `events` to the foreground profile unless it is locked; a pointer on the bar is
    /// dropped (a release there is sent at the frame's top edge, so no touch stays down).
    fn forward(&self, events: Vec<ClientMessage>) {
        if events.is_empty() {
            return;
        }
        let Some(h) = self.handset.upgrade() else {
            return;
        };
        let name = match h.current_foreground() {
            Ok(Some(name)) => name,
            Ok(None) => {
                tracing::debug!(
                    "device screen: {} input events, no profile in front",
                    events.len()
                );
                return;
            }
            Err(e) => {
                tracing::warn!("device screen: {} input events dropped: {e}", events.len());
                return;
            }
        };
        if crate::lock::is_locked(h.dir(), &name) {
            tracing::info!(
                "device screen: {} input events for locked {name} dropped",
                events.len()
            );
            return;
        }
        let mut slot = self.session.lock().unwrap_or_else(|e| e.into_inner());
        // A session kept from before may lead nowhere now (the VMM ended, the profile was
        // offloaded or returned): the events not sent go once more on a new one.
        let mut from = 0;
        for attempt in 0..2 {
            if slot.as_ref().map(|(n, _)| n) != Some(&name) {
                *slot = None;
                let Ok(socket) = h.vnc_socket(&name) else {
                    return;
                };
                match UnixStream::connect(&socket)
                    .map_err(display::SourceError::from)
                    .and_then(RfbSource::connect)
                {
                    Ok(source) => *slot = Some((name.clone(), source)),
                    Err(e) => {
                        tracing::warn!("device screen: input to {name} dropped: {e}");
                        return;
                    }
                }
            }
            let Some((_, source)) = slot.as_mut() else {
                return;
            };
            match self.send(source, &events[from..]) {
                Ok(()) => return,
                Err((sent, e)) => {
                    from += sent;
                    *slot = None;
                    if attempt == 1 {
                        tracing::warn!("device screen: input to {name} dropped: {e}");
                    }
                }
            }
        }
    }

    /// Sends `events` on `source`, the pointer moved up by the bar; on a failure, how many
    /// were sent before it.
    fn send(
        &self,
        source: &mut RfbSource<UnixStream>,
        events: &[ClientMessage],
    ) -> std::result::Result<(), (usize, display::SourceError)> {
        for (i, event) in events.iter().enumerate() {
            let sent = match *event {
                ClientMessage::Key { down, keysym } => source.key(keysym, down),
                ClientMessage::Pointer { buttons, x, y } => match y.checked_sub(self.bar_rows) {
                    Some(y) => source.pointer(buttons, x, y),
                    None if buttons == 0 => source.pointer(0, x, 0),
                    None => continue,
                },
                _ => continue,
            };
            sent.map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

/// Accepts device-screen viewers, one thread each, at most [`MAX_VIEWERS`] at once.
fn accept(listener: TcpListener, published: Arc<Published>, sink: Arc<InputSink>) {
    let viewers = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        if viewers.fetch_add(1, Ordering::SeqCst) >= MAX_VIEWERS {
            viewers.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("device screen: more than {MAX_VIEWERS} viewers, one turned away");
            continue;
        }
        let (p, sink, count) = (published.clone(), sink.clone(), viewers.clone());
        let spawned = std::thread::Builder::new()
            .name("device-viewer".into())
            .spawn(move || {
                if let Err(e) = serve_viewer(stream, &p, &sink) {
                    tracing::debug!("device viewer: {e}");
                }
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            viewers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// One viewer's RFB session over the published frames; its input goes to `sink`. A reader
/// thread passes the client's bytes on; the session's thread sleeps until they or a new
/// frame come.
fn serve_viewer(
    mut stream: TcpStream,
    published: &Published,
    sink: &InputSink,
) -> std::io::Result<()> {
    let Some((mut shown, first)) = published.latest() else {
        return Ok(());
    };
    let width = u16::try_from(first.width()).unwrap_or(u16::MAX);
    let height = u16::try_from(first.height()).unwrap_or(u16::MAX);
    let mut session =
        rfb::notice::NoticeSession::new(width, height, "pocketvisor device", &[]).keep_input();
    session.show(first.rgb());
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let (tx, rx) = mpsc::channel();
    published.subscribe(tx.clone());
    let mut reader = stream.try_clone()?;
    std::thread::Builder::new()
        .name("device-viewer-rx".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            let end = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        if tx.send(ViewerEvent::Client(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            let _ = tx.send(ViewerEvent::Closed(end));
        })?;
    let result = (|| {
        stream.write_all(rfb::notice::NoticeSession::greeting())?;
        // A frame published between latest() and subscribe() is picked up here.
        let mut event = ViewerEvent::Frame;
        loop {
            match event {
                ViewerEvent::Client(bytes) => {
                    let out = session
                        .receive(&bytes)
                        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
                    stream.write_all(&out)?;
                    sink.forward(session.take_input());
                }
                ViewerEvent::Frame => {
                    if let Some((generation, frame)) = published.latest() {
                        if generation != shown {
                            shown = generation;
                            stream.write_all(&session.show(frame.rgb()))?;
                        }
                    }
                }
                ViewerEvent::Closed(end) => return end,
            }
            event = match rx.recv() {
                Ok(e) => e,
                Err(_) => return Ok(()),
            };
        }
    })();
    // The reader thread ends when its socket does.
    let _ = stream.shutdown(std::net::Shutdown::Both);
    result
}
