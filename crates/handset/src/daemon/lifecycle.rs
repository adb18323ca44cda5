//! The profile lifecycle: every state change a profile can go through, in one table.
//!
//! [`step`] is the table: for a profile in a [`ProfileState`] and an [`Event`] (an operation
//! asked for through the API, or something the supervisor or the foreground scheduling
//! observed), it gives the [`Step`] (the state once the event is done and the work it takes)
//! or a [`Refused`]. The daemon asks it before every operation and records every state change
//! through it (`Registry::apply`), so an invalid transition is refused in this one place.

use crate::api_types::ProfileState;

/// Something that changes, or would change, a profile's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// API: boot a stopped or failed profile (a suspended one is resumed).
    Start,
    /// API: end a live profile's VMM, or drop a suspended profile's snapshot.
    Stop,
    /// API: snapshot a live profile and end its VMM.
    Suspend,
    /// API: restore a suspended profile.
    Resume,
    /// API: make a live profile, or an offloaded one with a screen (its twin's), the
    /// foreground one.
    Switch,
    /// API: remove a profile that has no VMM.
    Delete,
    /// API: stop a running profile's vCPUs, keeping it in memory (`profile pause`).
    Pause,
    /// API: let a paused profile's vCPUs run again (`profile unpause`).
    Unpause,
    /// API: migrate a running profile live to a cloud host (`profile offload`).
    Offload,
    /// API: bring an offloaded profile back from its cloud host (`profile return`).
    Return,
    /// Supervisor: a VMM for the profile is up and answering (boot, restore or restart).
    Launched,
    /// Supervisor: the VMM the daemon asked to end has ended.
    Stopped,
    /// Supervisor: the snapshot is written and the VMM has ended.
    Suspended,
    /// Supervisor: a suspended profile's snapshot was dropped.
    SnapshotDiscarded,
    /// Supervisor: the VMM ended on its own and is not restarted.
    Exited,
    /// Supervisor: the VMM ended and the restart limit is reached or the restart failed.
    GaveUp,
    /// Supervisor: the VMM was gone when the daemon started and is not restarted.
    Lost,
    /// Supervisor: the guest runs at the cloud host and the VMM here has ended.
    Offloaded,
    /// Foreground: a `background = "pause"` profile left the foreground and was paused.
    BackgroundPaused,
    /// Foreground: a paused profile came to the foreground and runs again.
    ForegroundResumed,
}

/// The work an accepted event takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Boot a new VMM from the profile's spec.
    Boot,
    /// Start a VMM restoring the profile's snapshot.
    Restore,
    /// End the VMM.
    StopVmm,
    /// Drop the snapshot.
    DiscardSnapshot,
    /// Snapshot the VM, then end its VMM.
    Snapshot,
    /// Pause the VMM's vCPUs.
    PauseVmm,
    /// Let the VMM's vCPUs run again.
    ResumeVmm,
    /// Reassign the foreground.
    Place,
    /// Remove the profile's files and registry row.
    Remove,
    /// Migrate the VM to the cloud host, then end its VMM.
    Migrate,
    /// Start a VMM that receives the guest back from the cloud host.
    Receive,
    /// Nothing beyond recording the new state.
    Record,
}

/// An accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The state once the event is done.
    pub next: ProfileState,
    /// The work it takes.
    pub action: Action,
}

/// An event the profile's state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The profile's state.
    pub state: ProfileState,
    /// The refused event.
    pub event: Event,
    why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Already,
    NotRunning,
    NotSuspended,
    NotPaused,
    PausedInBackground,
    StartFirst,
    StopFirst,
    NotOffloaded,
    InTheCloud,
    Invalid,
}

impl Refused {
    /// The message for profile `name` (the API's 409 text).
    pub fn message(&self, name: &str) -> String {
        let s = self.state.as_str();
        match self.why {
            Why::Already => format!("profile {name:?} is already {s}"),
            Why::NotRunning => format!("profile {name:?} is {s}, not running"),
            Why::NotSuspended => format!("profile {name:?} is {s}, not suspended"),
            Why::NotPaused => format!("profile {name:?} is {s}, not paused"),
            Why::PausedInBackground => {
                format!("profile {name:?} is paused in the background: switch to it")
            }
            Why::StartFirst => format!("profile {name:?} is {s}: start it first"),
            Why::StopFirst => format!("profile {name:?} is {s}: stop it first"),
            Why::NotOffloaded => format!("profile {name:?} is {s}, not offloaded"),
            Why::InTheCloud => format!(
                "profile {name:?} is offloaded: it runs at its cloud host, not here; bring it \
                 back with `pocketvisor profile return {name}` first"
            ),
            Why::Invalid => format!("profile {name:?} is {s}: {:?} does not apply", self.event),
        }
    }
}

/// The lifecycle table: what `event` does to a profile in `state`.
pub fn step(state: ProfileState, event: Event) -> Result<Step, Refused> {
    use Action as A;
    use Event as E;
    use ProfileState::{Failed, Offloaded, Paused, Running, Stopped, Suspended};
    let to = |next, action| Ok(Step { next, action });
    let no = |why| Err(Refused { state, event, why });
    match (state, event) {
        // The API's operations.
        (Stopped | Failed, E::Start) => to(Running, A::Boot),
        (Suspended, E::Start | E::Resume) => to(Running, A::Restore),
        (Running | Paused, E::Start) => no(Why::Already),
        (Running | Paused, E::Stop) => to(Stopped, A::StopVmm),
        (Suspended, E::Stop) => to(Stopped, A::DiscardSnapshot),
        (Stopped | Failed, E::Stop) => no(Why::NotRunning),
        (Running | Paused, E::Suspend) => to(Suspended, A::Snapshot),
        (Stopped | Failed | Suspended, E::Suspend) => no(Why::NotRunning),
        (Paused, E::Resume) => no(Why::PausedInBackground),
        (Stopped | Failed | Running, E::Resume) => no(Why::NotSuspended),
        (Running | Paused, E::Switch) => to(state, A::Place),
        (Stopped | Failed | Suspended, E::Switch) => no(Why::StartFirst),
        (Running | Paused, E::Delete) => no(Why::StopFirst),
        (Stopped | Failed | Suspended, E::Delete) => to(Stopped, A::Remove),
        (Running, E::Pause) => to(Paused, A::PauseVmm),
        (Paused, E::Pause) => no(Why::Already),
        (Stopped | Failed | Suspended, E::Pause) => no(Why::NotRunning),
        (Paused, E::Unpause) => to(Running, A::ResumeVmm),
        (Stopped | Failed | Suspended | Running, E::Unpause) => no(Why::NotPaused),
        (Running, E::Offload) => to(Offloaded, A::Migrate),
        (Paused | Stopped | Failed | Suspended, E::Offload) => no(Why::NotRunning),
        (Offloaded, E::Offload) => no(Why::Already),
        (Offloaded, E::Return) => to(Running, A::Receive),
        // The device screen shows an offloaded profile's twin (the daemon checks that it has
        // a screen): nothing is run or paused here.
        (Offloaded, E::Switch) => to(Offloaded, A::Place),
        (Stopped | Failed | Suspended | Running | Paused, E::Return) => no(Why::NotOffloaded),
        // An offloaded profile's guest runs at the cloud host: nothing runs it, ends it or
        // removes it here until it is back.
        (
            Offloaded,
            E::Start | E::Stop | E::Suspend | E::Resume | E::Delete | E::Pause | E::Unpause,
        ) => no(Why::InTheCloud),
        // The supervisor's observations. A restart after a crash launches over a state that
        // is still running or paused; a boot or restore over stopped, failed or suspended.
        (_, E::Launched) => to(Running, A::Record),
        (Running | Paused, E::Stopped | E::Exited | E::Lost) => to(Stopped, A::Record),
        (Running | Paused, E::Suspended) => to(Suspended, A::Record),
        (Running | Paused, E::Offloaded) => to(Offloaded, A::Record),
        (Suspended, E::SnapshotDiscarded) => to(Stopped, A::Record),
        (Running | Paused, E::GaveUp) => to(Failed, A::Record),
        // Foreground scheduling.
        (Running, E::BackgroundPaused) => to(Paused, A::Record),
        (Paused, E::ForegroundResumed) => to(Running, A::Record),
        (
            Stopped | Failed | Suspended | Offloaded,
            E::Stopped | E::Exited | E::Lost | E::Suspended | E::GaveUp | E::Offloaded,
        )
        | (Offloaded, E::SnapshotDiscarded | E::BackgroundPaused | E::ForegroundResumed)
        | (Stopped | Failed | Running | Paused, E::SnapshotDiscarded)
        | (Stopped | Failed | Suspended | Paused, E::BackgroundPaused)
        | (Stopped | Failed | Suspended | Running, E::ForegroundResumed) => no(Why::Invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProfileState::{Failed, Offloaded, Paused, Running, Stopped, Suspended};

    const STATES: [ProfileState; 6] = [Stopped, Running, Paused, Suspended, Failed, Offloaded];
    const EVENTS: [Event; 20] = [
        Event::Offload,
        Event::Return,
        Event::Offloaded,
        Event::Pause,
        Event::Unpause,
        Event::Start,
        Event::Stop,
        Event::Suspend,
        Event::Resume,
        Event::Switch,
        Event::Delete,
        Event::Launched,
        Event::Stopped,
        Event::Suspended,
        Event::SnapshotDiscarded,
        Event::Exited,
        Event::GaveUp,
        Event::Lost,
        Event::BackgroundPaused,
        Event::ForegroundResumed,
    ];

    fn next(s: ProfileState, e: Event) -> Option<ProfileState> {
        step(s, e).ok().map(|st| st.next)
    }

    #[test]
    fn the_api_operations_follow_the_documented_lifecycle() {
        assert_eq!(step(Stopped, Event::Start).unwrap().action, Action::Boot);
        assert_eq!(step(Failed, Event::Start).unwrap().action, Action::Boot);
        // Starting a suspended profile resumes it.
        assert_eq!(
            step(Suspended, Event::Start).unwrap(),
            Step {
                next: Running,
                action: Action::Restore
            }
        );
        assert_eq!(step(Running, Event::Stop).unwrap().action, Action::StopVmm);
        assert_eq!(step(Paused, Event::Stop).unwrap().action, Action::StopVmm);
        assert_eq!(
            step(Suspended, Event::Stop).unwrap().action,
            Action::DiscardSnapshot
        );
        assert_eq!(next(Running, Event::Suspend), Some(Suspended));
        assert_eq!(next(Paused, Event::Suspend), Some(Suspended));
        assert_eq!(next(Suspended, Event::Resume), Some(Running));
        assert_eq!(next(Paused, Event::Switch), Some(Paused));
        assert_eq!(step(Failed, Event::Delete).unwrap().action, Action::Remove);
        assert_eq!(
            step(Suspended, Event::Delete).unwrap().action,
            Action::Remove
        );
    }

    #[test]
    fn pause_and_unpause_toggle_a_live_profile_in_memory() {
        assert_eq!(
            step(Running, Event::Pause).unwrap(),
            Step {
                next: Paused,
                action: Action::PauseVmm
            }
        );
        assert_eq!(
            step(Paused, Event::Unpause).unwrap(),
            Step {
                next: Running,
                action: Action::ResumeVmm
            }
        );
        let msg = |s, e| step(s, e).unwrap_err().message("work");
        assert_eq!(
            msg(Paused, Event::Pause),
            "profile \"work\" is already paused"
        );
        assert_eq!(
            msg(Suspended, Event::Pause),
            "profile \"work\" is suspended, not running"
        );
        assert_eq!(
            msg(Running, Event::Unpause),
            "profile \"work\" is running, not paused"
        );
        assert_eq!(
            msg(Suspended, Event::Unpause),
            "profile \"work\" is suspended, not paused"
        );
    }

    #[test]
    fn refusals_say_why_in_the_apis_words() {
        let msg = |s, e| step(s, e).unwrap_err().message("work");
        assert_eq!(
            msg(Running, Event::Start),
            "profile \"work\" is already running"
        );
        assert_eq!(
            msg(Stopped, Event::Stop),
            "profile \"work\" is stopped, not running"
        );
        assert_eq!(
            msg(Suspended, Event::Suspend),
            "profile \"work\" is suspended, not running"
        );
        assert_eq!(
            msg(Paused, Event::Resume),
            "profile \"work\" is paused in the background: switch to it"
        );
        assert_eq!(
            msg(Running, Event::Resume),
            "profile \"work\" is running, not suspended"
        );
        assert_eq!(
            msg(Failed, Event::Switch),
            "profile \"work\" is failed: start it first"
        );
        assert_eq!(
            msg(Paused, Event::Delete),
            "profile \"work\" is paused: stop it first"
        );
        assert!(msg(Stopped, Event::BackgroundPaused).contains("does not apply"));
    }

    #[test]
    fn only_a_vmm_makes_a_profile_live() {
        // Running and paused need a VMM: the only ways in are a launch and the foreground
        // toggling between them.
        for s in STATES {
            for e in EVENTS {
                if let Some(n) = next(s, e) {
                    if matches!(n, Running | Paused) && !matches!(s, Running | Paused) {
                        assert!(
                            e == Event::Launched
                                || e == Event::Start
                                || e == Event::Resume
                                || e == Event::Return,
                            "{s:?} --{e:?}--> {n:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_live_profile_cannot_be_deleted_or_lose_its_vmm_silently() {
        for s in [Running, Paused] {
            assert!(step(s, Event::Delete).is_err());
            assert!(step(s, Event::Start).is_err());
            assert!(step(s, Event::SnapshotDiscarded).is_err());
        }
        // Ending events only apply to a live profile.
        for s in [Stopped, Failed, Suspended] {
            for e in [Event::Stopped, Event::Exited, Event::Lost, Event::GaveUp] {
                assert!(step(s, e).is_err(), "{s:?} {e:?}");
            }
        }
    }

    #[test]
    fn the_foreground_only_toggles_running_and_paused() {
        assert_eq!(next(Running, Event::BackgroundPaused), Some(Paused));
        assert_eq!(next(Paused, Event::ForegroundResumed), Some(Running));
        for s in [Stopped, Failed, Suspended, Paused] {
            assert!(step(s, Event::BackgroundPaused).is_err(), "{s:?}");
        }
        for s in [Stopped, Failed, Suspended, Running] {
            assert!(step(s, Event::ForegroundResumed).is_err(), "{s:?}");
        }
    }

    #[test]
    fn crashes_end_stopped_or_failed_and_restarts_relaunch() {
        for s in [Running, Paused] {
            assert_eq!(next(s, Event::Exited), Some(Stopped));
            assert_eq!(next(s, Event::Lost), Some(Stopped));
            assert_eq!(next(s, Event::GaveUp), Some(Failed));
            assert_eq!(next(s, Event::Launched), Some(Running));
        }
    }

    #[test]
    fn an_offloaded_profile_runs_here_again_only_through_a_return() {
        assert_eq!(
            step(Running, Event::Offload).unwrap(),
            Step {
                next: Offloaded,
                action: Action::Migrate
            }
        );
        assert_eq!(
            step(Offloaded, Event::Return).unwrap(),
            Step {
                next: Running,
                action: Action::Receive
            }
        );
        assert_eq!(next(Running, Event::Offloaded), Some(Offloaded));
        for e in EVENTS {
            let allowed = matches!(e, Event::Return | Event::Launched | Event::Switch);
            assert_eq!(step(Offloaded, e).is_ok(), allowed, "{e:?}");
        }
        // A switch shows its twin's screen: it stays offloaded, nothing runs here.
        assert_eq!(
            step(Offloaded, Event::Switch).unwrap(),
            Step {
                next: Offloaded,
                action: Action::Place
            }
        );
        let msg = |s, e| step(s, e).unwrap_err().message("work");
        for e in [Event::Start, Event::Delete, Event::Stop] {
            assert!(
                msg(Offloaded, e).contains("profile return work"),
                "{}",
                msg(Offloaded, e)
            );
        }
        assert_eq!(
            msg(Running, Event::Return),
            "profile \"work\" is running, not offloaded"
        );
        assert_eq!(
            msg(Suspended, Event::Offload),
            "profile \"work\" is suspended, not running"
        );
    }
}
