//! The worker-thread pattern shared by all virtio devices, and queue handling helpers.
//!
//! [`spawn_worker`] starts a named thread running an epoll loop over the queues' kick eventfds,
//! a stop eventfd and whatever backend fds the [`DeviceWorker`] registers. [`WorkerHandle::stop`]
//! (called from `reset`, and on drop) signals the stop eventfd and joins the thread.
//!
//! [`VirtQueue`] wraps a `virtio_queue::Queue` with strict chain parsing ([`parse_chain`]),
//! completion, notification, and the "broken until reset" state a queue enters when the driver
//! corrupts it beyond what an error status can report.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use virtio_queue::{Error as QueueError, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{parse_chain, Chain, ChainError};
use super::{ActivateError, ActiveQueue, Interrupt};
use crate::GuestMem;

/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Feature bits every device here offers.
pub const COMMON_FEATURES: u64 =
    super::VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// Epoll tokens at or above this value belong to the device's backend fds; below it, a token is
/// the position of a queue in the activation order.
pub const BACKEND_TOKEN_BASE: u64 = 1 << 32;
const STOP_TOKEN: u64 = u64::MAX;
const PAUSE_TOKEN: u64 = u64::MAX - 1;
/// The thread hook was set after this worker started: it narrows itself now.
const NARROW_TOKEN: u64 = u64::MAX - 2;

/// Pause handshake between a [`WorkerHandle`] and its thread.
#[derive(Default)]
struct PauseState {
    /// The handle wants the worker parked.
    requested: bool,
    /// The worker is parked (between two epoll rounds, no chain in flight).
    parked: bool,
    /// The handle is stopping the worker: a parked worker exits without another round.
    stopping: bool,
}

#[derive(Default)]
struct PauseCtl {
    state: Mutex<PauseState>,
    changed: Condvar,
}

impl PauseCtl {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a device runs on its worker thread.
pub trait DeviceWorker: Send + 'static {
    /// Registers backend fds with `epoll`, using tokens >= [`BACKEND_TOKEN_BASE`].
    fn register(&mut self, _epoll: &Epoll) -> io::Result<()> {
        Ok(())
    }
    /// Queue number `queue` (position in the activation order) was kicked (also called once for
    /// every queue when the worker starts).
    fn queue_kicked(&mut self, epoll: &Epoll, queue: usize);
    /// A backend fd registered with `token` is ready with `events`.
    fn backend_event(&mut self, _epoll: &Epoll, _token: u64, _events: EventSet) {}
}

impl DeviceWorker for Box<dyn DeviceWorker> {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        (**self).register(epoll)
    }
    fn queue_kicked(&mut self, epoll: &Epoll, queue: usize) {
        (**self).queue_kicked(epoll, queue);
    }
    fn backend_event(&mut self, epoll: &Epoll, token: u64, events: EventSet) {
        (**self).backend_event(epoll, token, events);
    }
}

/// A running worker thread.
pub struct WorkerHandle {
    stop: EventFd,
    pause: EventFd,
    ctl: Arc<PauseCtl>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Signals the worker to stop and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    /// Parks the worker between two rounds of its event loop and waits until it is parked.
    /// Every chain the worker popped has been completed by then (workers never hold a chain
    /// across rounds), so the used ring index equals the queue's next available index. Events
    /// that arrive while parked (kicks, backend readiness) are handled after [`resume`].
    ///
    /// [`resume`]: Self::resume
    pub fn pause(&self) {
        let Some(thread) = &self.thread else { return };
        let mut st = self.ctl.lock();
        st.requested = true;
        if let Err(e) = self.pause.write(1) {
            tracing::error!("cannot signal virtio worker to pause: {e}");
            st.requested = false;
            return;
        }
        while !st.parked && !thread.is_finished() {
            st = self
                .ctl
                .changed
                .wait_timeout(st, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets a paused worker run again.
    pub fn resume(&self) {
        let mut st = self.ctl.lock();
        st.requested = false;
        self.ctl.changed.notify_all();
        drop(st);
    }

    fn stop_and_join(&mut self) {
        {
            let mut st = self.ctl.lock();
            st.stopping = true;
            st.requested = false;
            self.ctl.changed.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!("cannot signal virtio worker to stop: {e}");
            }
            if thread.join().is_err() {
                tracing::error!("virtio worker thread panicked");
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// A device's worker while it is active: pausing, resuming and stopping an empty slot do
/// nothing.
#[derive(Default)]
pub struct WorkerSlot(Option<WorkerHandle>);

impl WorkerSlot {
    /// Puts a newly started worker in the slot, stopping the one before it (if any).
    pub fn set(&mut self, handle: WorkerHandle) {
        self.stop();
        self.0 = Some(handle);
    }

    /// Stops the worker, if any, and waits for it.
    pub fn stop(&mut self) {
        if let Some(worker) = self.0.take() {
            worker.stop();
        }
    }

    /// See [`WorkerHandle::pause`].
    pub fn pause(&self) {
        if let Some(worker) = &self.0 {
            worker.pause();
        }
    }

    /// See [`WorkerHandle::resume`].
    pub fn resume(&self) {
        if let Some(worker) = &self.0 {
            worker.resume();
        }
    }
}

/// Starts `worker` on a thread named `name`, polling `kicks` (token = position) and the fds the
/// worker registers.
pub fn spawn_worker<W: DeviceWorker>(
    name: &str,
    kicks: Vec<EventFd>,
    mut worker: W,
) -> io::Result<WorkerHandle> {
    let epoll = Epoll::new()?;
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let pause = EventFd::new(EFD_NONBLOCK)?;
    add_fd(&epoll, stop.as_raw_fd(), STOP_TOKEN, EventSet::IN)?;
    add_fd(&epoll, pause.as_raw_fd(), PAUSE_TOKEN, EventSet::IN)?;
    for (token, kick) in (0u64..).zip(&kicks) {
        add_fd(&epoll, kick.as_raw_fd(), token, EventSet::IN)?;
    }
    worker.register(&epoll)?;
    let ctl = Arc::new(PauseCtl::default());
    let thread_pause = pause.try_clone()?;
    let thread_ctl = ctl.clone();
    // Started before the thread hook was set (a restored VM's device): it narrows itself
    // once the hook is set (the event stays readable; it is removed after).
    let hook_event = crate::threads::hook_set_event()?;
    add_fd(&epoll, hook_event, NARROW_TOKEN, EventSet::IN)?;
    let thread = crate::threads::spawn(name, move || {
        if crate::threads::started(crate::threads::ThreadKind::DeviceWorker) {
            let _ = remove_fd(&epoll, hook_event);
        }
        run(epoll, kicks, worker, &thread_pause, &thread_ctl)
    })?;
    Ok(WorkerHandle {
        stop,
        pause,
        ctl,
        thread: Some(thread),
    })
}

/// Adds `fd` to `epoll` with `token` and `events`.
pub fn add_fd(epoll: &Epoll, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
}

/// Removes `fd` from `epoll`.
pub fn remove_fd(epoll: &Epoll, fd: RawFd) -> io::Result<()> {
    epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
}

/// Parks the calling worker thread until the handle resumes it. Returns true if the handle
/// is stopping the worker instead: it must exit without touching its queues again.
fn park(pause: &EventFd, ctl: &PauseCtl) -> bool {
    // Drain the counter; a spurious wake-up (EAGAIN) is harmless.
    let _ = pause.read();
    let mut st = ctl.lock();
    if !st.requested {
        return st.stopping;
    }
    st.parked = true;
    ctl.changed.notify_all();
    while st.requested {
        st = ctl.changed.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.parked = false;
    st.stopping
}

fn run<W: DeviceWorker>(
    epoll: Epoll,
    kicks: Vec<EventFd>,
    mut worker: W,
    pause: &EventFd,
    ctl: &PauseCtl,
) {
    for i in 0..kicks.len() {
        worker.queue_kicked(&epoll, i);
    }
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio worker epoll failed: {e}");
                return;
            }
        };
        let ready = events.get(..n).unwrap_or_default();
        // Stopping wins over whatever else is ready in the same round.
        if ready.iter().any(|ev| ev.data() == STOP_TOKEN) {
            return;
        }
        let mut pause_asked = false;
        for ev in ready {
            let token = ev.data();
            if token == PAUSE_TOKEN {
                pause_asked = true;
                continue;
            }
            if token == NARROW_TOKEN {
                let _ = remove_fd(&epoll, crate::threads::hook_set_event().unwrap_or(-1));
                crate::threads::started(crate::threads::ThreadKind::DeviceWorker);
                continue;
            }
            let queue = usize::try_from(token)
                .ok()
                .filter(|_| token < BACKEND_TOKEN_BASE)
                .and_then(|q| Some((q, kicks.get(q)?)));
            if let Some((queue, kick)) = queue {
                // Drain the counter; a spurious wake-up (EAGAIN) is harmless.
                let _ = kick.read();
                worker.queue_kicked(&epoll, queue);
            } else {
                worker.backend_event(&epoll, token, ev.event_set());
            }
        }
        // Park only after the whole round: every handler has completed what it popped.
        if pause_asked && park(pause, ctl) {
            return;
        }
    }
}

/// Splits activated queues into [`VirtQueue`]s and their kick eventfds, checking that every
/// queue is ready and lies in guest memory, and applying the negotiated ring features.
pub fn prepare_queues(
    mem: &GuestMem,
    queues: Vec<ActiveQueue>,
    acked_features: u64,
    expected: usize,
) -> Result<(Vec<VirtQueue>, Vec<EventFd>), ActivateError> {
    if queues.len() != expected {
        return Err(ActivateError::BadQueue(
            u16::try_from(queues.len()).unwrap_or(u16::MAX),
        ));
    }
    let mut vqs = Vec::with_capacity(queues.len());
    let mut kicks = Vec::with_capacity(queues.len());
    for (pos, aq) in queues.into_iter().enumerate() {
        let mut queue = aq.queue;
        if aq.index as usize != pos || !queue.is_valid(mem) {
            return Err(ActivateError::BadQueue(aq.index));
        }
        queue.set_event_idx(acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        vqs.push(VirtQueue {
            index: aq.index,
            queue,
            indirect: acked_features & VIRTIO_RING_F_INDIRECT_DESC != 0,
            broken: false,
            completed: false,
        });
        kicks.push(aq.kick);
    }
    Ok((vqs, kicks))
}

/// The result of taking the next available chain.
#[derive(Debug)]
pub enum Popped {
    /// A validated chain.
    Chain(Chain),
    /// A malformed chain: complete `head` (with used length 0) and move on.
    Malformed { head: u16, error: ChainError },
}

/// A queue owned by a device worker.
pub struct VirtQueue {
    /// The queue's index in the device.
    pub index: u16,
    /// The underlying split queue.
    pub queue: Queue,
    indirect: bool,
    broken: bool,
    /// Chains were completed since the last `notify`.
    completed: bool,
}

impl VirtQueue {
    /// Whether the queue was given up on until reset.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn fail(&mut self, interrupt: &dyn Interrupt, why: &dyn std::fmt::Display) {
        crate::guest_warn!("virtio queue {} broken until reset: {why}", self.index);
        self.broken = true;
        interrupt.device_error();
    }

    /// Takes the next available chain. Returns `None` when the ring is empty (after re-enabling
    /// notifications, so no kick is missed) or the queue is broken.
    pub fn pop(&mut self, mem: &GuestMem, interrupt: &dyn Interrupt) -> Option<Popped> {
        loop {
            if self.broken {
                return None;
            }
            let desc_table = GuestAddress(self.queue.desc_table());
            let size = self.queue.size();
            let head = match self.queue.iter(mem) {
                Ok(mut it) => it.next().map(|c| c.head_index()),
                Err(QueueError::QueueNotReady) => return None,
                Err(e) => {
                    self.fail(interrupt, &e);
                    return None;
                }
            };
            match head {
                Some(head) if head >= size => {
                    self.fail(interrupt, &ChainError::IndexOutOfRange(head));
                    return None;
                }
                Some(head) => {
                    return Some(
                        match parse_chain(mem, desc_table, size, head, self.indirect) {
                            Ok(chain) => Popped::Chain(chain),
                            Err(error) => Popped::Malformed { head, error },
                        },
                    )
                }
                None => match self.queue.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => {
                        self.fail(interrupt, &e);
                        return None;
                    }
                },
            }
        }
    }

    /// Puts back the chain just popped (it will be returned again by the next `pop`).
    pub fn undo_pop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Returns chain `head` to the driver with `len` bytes written. Returns false (and breaks
    /// the queue) if the used ring cannot be written.
    pub fn complete(
        &mut self,
        mem: &GuestMem,
        interrupt: &dyn Interrupt,
        head: u16,
        len: u32,
    ) -> bool {
        if self.broken {
            return false;
        }
        match self.queue.add_used(mem, head, len) {
            Ok(()) => {
                self.completed = true;
                true
            }
            Err(e) => {
                self.fail(interrupt, &e);
                false
            }
        }
    }

    /// Serves every available chain: `handle` gets each one (malformed ones too) and returns
    /// its head and used length; each is completed, and the driver is notified once at the
    /// end if it asked to be. Stops early if the queue breaks.
    pub fn serve(
        &mut self,
        mem: &GuestMem,
        interrupt: &dyn Interrupt,
        mut handle: impl FnMut(Popped) -> (u16, u32),
    ) {
        while let Some(popped) = self.pop(mem, interrupt) {
            let (head, used) = handle(popped);
            if !self.complete(mem, interrupt, head, used) {
                break;
            }
        }
        self.notify(mem, interrupt);
    }

    /// Signals the driver if completions since the last call require it.
    pub fn notify(&mut self, mem: &GuestMem, interrupt: &dyn Interrupt) {
        if self.broken || !std::mem::take(&mut self.completed) {
            return;
        }
        match self.queue.needs_notification(mem) {
            Ok(true) => interrupt.signal_queue(self.index),
            Ok(false) => {}
            Err(e) => self.fail(interrupt, &e),
        }
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;
#[cfg(test)]
mod tests;
