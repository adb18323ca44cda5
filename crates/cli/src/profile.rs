//! `pocketvisor profile ...`: the handset daemon's CLI.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use handset::client::Client;
use handset::daemon::clone_files::CloneDirection;
use handset::{CreateProfile, Event, ProfileInfo, ProfileSpec};
use zeroize::Zeroizing;

/// Manage the handset's profiles through the daemon.
#[derive(Args, Debug)]
#[command(after_help = "\
The daemon (`pocketvisor handset`) must be running. Its socket is DIR/handset.sock for
--state-dir DIR (default $POCKETVISOR_STATE_DIR, else /var/lib/pocketvisor), or --socket.

EXAMPLES:
  pocketvisor profile create work --template work
  pocketvisor profile create lab --file lab.toml
  pocketvisor profile create home --template personal --kernel vmlinux \\
      --initrd initramfs.cpio.gz --cmdline 'console=ttyS0 quiet'
  pocketvisor profile start work && pocketvisor profile switch work
  pocketvisor profile list --json")]
pub struct ProfileArgs {
    /// State directory of the daemon.
    #[arg(long, value_name = "DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// The daemon's socket (overrides --state-dir).
    #[arg(long, value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    cmd: ProfileCmd,
}

/// `profile passcode ...`.
#[derive(Subcommand, Debug)]
enum PasscodeCmd {
    /// Set (or replace) an unlocked profile's passcode (4 to 1024 bytes, hashed with argon2id).
    #[command(after_help = "\
Read from the terminal without echo (typed twice), else the first line of stdin, or of
--passcode-file. A locked profile's passcode cannot be changed.")]
    Set {
        /// Profile name.
        name: String,
        /// Read the passcode from the first line of FILE (tests, scripts).
        #[arg(long, value_name = "FILE")]
        passcode_file: Option<PathBuf>,
    },
}

/// A passcode from the first line of `file`, else typed at the terminal without echo (twice
/// if `confirm`), else the first line of stdin.
fn read_passcode(file: Option<&std::path::Path>, confirm: bool) -> Result<Zeroizing<String>> {
    let first_line = |mut text: Zeroizing<String>| {
        let end = text.find(['\n', '\r']).unwrap_or(text.len());
        text.truncate(end);
        text
    };
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the passcode file {}", f.display()))?;
        return Ok(first_line(Zeroizing::new(text)));
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let code = crate::portable::secret::prompt("Passcode: ")?;
        if confirm {
            let again = crate::portable::secret::prompt("Passcode again: ")?;
            if *again != *code {
                anyhow::bail!("the passcodes differ");
            }
        }
        return Ok(code);
    }
    let mut line = Zeroizing::new(String::new());
    std::io::BufRead::read_line(&mut std::io::stdin().lock(), &mut line)
        .context("cannot read the passcode from stdin")?;
    Ok(first_line(line))
}

#[derive(Subcommand, Debug)]
enum ProfileCmd {
    /// Create a profile from a template (work, personal) or a TOML spec file.
    #[command(after_help = "\
A spec file has the fields of profile.toml: name, kernel (\"probe\" or the file name of a guest
asset in <state-dir>/assets/; never a path), initrd (an asset file name too), cmdline, or
firmware instead of kernel, initrd and cmdline (an asset: SeaBIOS's bios.bin, which boots the
first disk's own boot loader), memory_mib, vcpus, disks = [{name, size_mib, read_only, image}]
(image: an asset the disk starts as a copy of, a whole disk image; size_mib 0: its size), net (TAP name), display = {width,
height}, restart (never|on-failure|always), background (run|pause: paused in memory while
another profile is in the foreground; \"suspend\" is its old name), cpu = {foreground,
background}, memory_max_mib, channels = {clipboard_to, files_to, clipboard_from, files_from}
(cross-profile sending and accepting, the peer \"host\" being the host; see `profile clipboard
copy --help` and `profile clipboard set --help`), balloon (default true),
mergeable (KSM, default false), on_shutdown (stop|suspend: what a clean daemon stop does with
the running guest; default stop, suspend for the templates), autostart (start or resume it when
the daemon starts; default false), encrypt_at_rest (default false; as --encrypt).")]
    Create {
        /// Profile name: 1-32 of a-z, 0-9 and -, not beginning with - (with --template;
        /// overrides the file's).
        name: Option<String>,
        /// Template: work or personal (the probe guest running its agent unless --kernel).
        #[arg(long, conflicts_with = "file")]
        template: Option<String>,
        /// A TOML profile spec.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Kernel replacing the template's or the file's: the file name of a guest asset in
        /// <state-dir>/assets/ (copy the kernel there first).
        #[arg(long, value_name = "ASSET", conflicts_with = "firmware")]
        kernel: Option<String>,
        /// Initial ramdisk replacing the template's (none) or the file's: a guest asset's file
        /// name, like --kernel.
        #[arg(long, value_name = "ASSET")]
        initrd: Option<String>,
        /// Kernel command line replacing the template's or the file's (a template's is the
        /// probe's agent mode, or `console=ttyS0` with --kernel).
        #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
        cmdline: Option<String>,
        /// Firmware the template boots instead of the probe guest (SeaBIOS's bios.bin copied
        /// into <state-dir>/assets/); needs --disk-image.
        #[arg(
            long,
            value_name = "ASSET",
            requires = "disk_image",
            requires = "template"
        )]
        firmware: Option<String>,
        /// The whole disk image (an asset, such as a Debian image with GRUB) the template's
        /// `system` disk starts as a copy of, booted by --firmware.
        #[arg(long, value_name = "ASSET", requires = "firmware")]
        disk_image: Option<String>,
        /// Encrypt the profile's disks at rest (AES-256-XTS under a random data key of its
        /// own, wrapped by this handset's device key; `encrypt_at_rest = true` in a spec
        /// file). Chosen here for good: a profile cannot be encrypted later.
        #[arg(long)]
        encrypt: bool,
        /// Put the profile under the organisation's MDM (`handset --mdm`), which may then
        /// push policies to it, lock, unlock and wipe it, and sees it in compliance reports
        /// (`managed = true` in a spec file). A profile created without it stays invisible
        /// to the MDM.
        #[arg(long)]
        managed: bool,
    },
    /// List profiles.
    List,
    /// Show one profile and its spec.
    Show {
        /// Profile name.
        name: String,
    },
    /// Change a profile's settings (KEY=VALUE ...), applied when it next starts.
    #[command(after_help = "\
Changeable: memory_mib, vcpus, cmdline, display.width, display.height, balloon, mergeable (the
machine: refused while suspended, its saved guest was made with them), memory_max_mib,
restart, background, cpu.foreground, cpu.background, channels.clipboard_to (a list:
'[\"work\"]'), channels.files_to, channels.clipboard_from, channels.files_from, on_shutdown,
autostart. A VALUE that is JSON (512, true, [\"work\"]) is taken as such, anything else as a
string; null sets memory_max_mib, channels.clipboard_from or channels.files_from back to its
default. Every change is checked together and written at once: all of them apply, or none.
A running guest keeps its settings until it is stopped and started; channel rules apply at
the next transfer.

EXAMPLE:
  pocketvisor profile set work memory_mib=512 vcpus=2 autostart=true")]
    Set {
        /// Profile name.
        name: String,
        /// KEY=VALUE (KEY may be a.b for a nested setting).
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
    /// Start a profile's VM (a suspended profile is resumed).
    #[command(after_help = "\
A profile that `pocketvisor export` moved to a file (`list` shows `moved to FILE`) is refused:
the guest would run twice. --reclaim runs this copy anyway and removes the mark.")]
    Start {
        /// Profile name.
        name: String,
        /// Start a profile marked as moved by an export.
        #[arg(long)]
        reclaim: bool,
    },
    /// Stop a profile's VM (asks the VMM, then SIGTERM, then SIGKILL).
    #[command(after_help = "\
A suspended profile has no VM but a saved guest (its snapshot): stopping it discards that
state, so it is refused unless --discard is given.")]
    Stop {
        /// Profile name.
        name: String,
        /// Also stop a suspended profile, discarding its saved guest.
        #[arg(long)]
        discard: bool,
    },
    /// Snapshot a running profile to disk and end its VMM (`resume` restores it).
    Suspend {
        /// Profile name.
        name: String,
    },
    /// Migrate a running profile live to a cloud host, where it runs on (`profile return`
    /// brings it back).
    #[command(after_help = "\
The cloud host is `pocketvisor cloud serve` at HOST:PORT (its certificate must name HOST and
chain to <state-dir>/cloud/ca.pem). This device shows <state-dir>/cloud/cert.pem and key.pem,
which name it there, and shares <state-dir>/cloud/migration.key with the host. The profile's
VMM keeps a copy of the guest as it is at the switch in profiles/NAME/cloud-kept/ and ends
once the guest runs at the host, as this device's twin NAME; the profile is then `offloaded`
(start, resume, stop, delete and export are refused) until `profile return NAME`. A profile
with a screen keeps it, its twin's: `profile view NAME`, and the device screen while it is in
front (it stays there if it was; `profile switch NAME` brings it there). If
the offload fails (host down, refused, no convergence) the guest runs on here and the profile
stays running. Not for a profile whose VMM is jailed (the handset without --no-jail), nor one
with encrypted disks (the host refuses those), nor one with a network device on a host not
started with --twin-bridge (which puts a twin's network devices on its bridge). See
docs/cloud.md.

EXAMPLE:
  pocketvisor profile offload work --to cloud.example:7000
  pocketvisor profile return work")]
    Offload {
        /// Profile name.
        name: String,
        /// The cloud host, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
    },
    /// Keep a replica of a profile at a cloud host: the daemon takes an encrypted checkpoint
    /// every period while the profile runs (until --stop).
    Replicate(crate::replica::ProfileReplicateArgs),
    /// Add the VM a replica's last checkpoint holds to this handset as a suspended profile.
    Recover(crate::replica::ProfileRecoverArgs),
    /// Start a live copy of a running profile at a cloud host; the original runs on here.
    #[command(after_help = "\
The profile's VMM migrates the guest to the cloud host (HOST:PORT, with this device's identity
in <state-dir>/cloud/, as `profile offload`) but resumes it here once the copy runs there:
both run on from the same moment, each with its own disk from then on. The host runs the copy
as this device's twin NAME (kind clone) with a fresh identity: a new vsock CID, which the
guest learns from its vsock device (a transport reset; the probe prints `PROBE twin cid=N`),
and the daemon tells the copy's agent, if it has one, that it is a twin of NAME (the Linux
agent writes NAME to /var/lib/pocketvisor-agent/twin; event twin-notified). The host is
recorded (`profile show`: clone at) for `profile file from-clone` and `to-clone`, which move
files between the copy's agent inbox and the original's. A network device gets a fresh MAC
(the probe prints `PROBE twin mac=M`; a Linux guest's driver reads it at its next probe only)
on a host started with --twin-bridge; a host without it refuses a profile with one. A clone does not return (its original runs here); another device cannot reach it. If
the clone fails, nothing runs there and the guest runs on here. A jailed VMM (the default)
migrates to a unix socket in its run directory, and the daemon relays it to the host inside
the device's TLS.

EXAMPLE:
  pocketvisor profile clone work --to cloud.example:7000
  pocketvisor cloud view work --from cloud.example:7000 ...   # its screen, if it has one")]
    Clone {
        /// Profile name.
        name: String,
        /// The cloud host, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
    },
    /// Bring an offloaded profile back from its cloud host and run it here.
    #[command(after_help = "\
Asks the cloud host the profile was offloaded to for its twin (with this device's identity in
<state-dir>/cloud/) and receives its live migration onto the copy kept at the offload: only
the memory pages and disk chunks that differ from it travel. The profile runs here again
once the guest does; the twin then ends at the host. If the return fails, nothing runs here,
the profile's disks are as they were, it stays offloaded and the twin runs on.")]
    Return {
        /// Profile name.
        name: String,
    },
    /// Restore a suspended profile from its snapshot.
    #[command(after_help = "\
A profile that `pocketvisor export` moved to a file is refused unless --reclaim is given.")]
    Resume {
        /// Profile name.
        name: String,
        /// Resume a profile marked as moved by an export.
        #[arg(long)]
        reclaim: bool,
    },
    /// Pause a running profile in memory: its vCPUs stop, its RAM stays (see `unpause`).
    #[command(after_help = "\
pause/unpause keep the guest in its VMM's memory (instant, nothing written); suspend/resume
save it to disk and end the VMM (the memory goes back to the host). A profile you paused stays
paused when switched to and refuses clipboard and file transfers until unpaused; `list` shows
it as `paused` with the detail `user` (`background` for one paused by `background = \"pause\"`,
which a switch runs again).")]
    Pause {
        /// Profile name.
        name: String,
    },
    /// Let a profile paused with `pause` run again.
    Unpause {
        /// Profile name.
        name: String,
    },
    /// Lock a profile: it is paused (if it runs) and refuses start, resume, unpause, switch,
    /// screenshots, viewing, its console, channel transfers and export until it is unlocked
    /// with its passcode; open console and screen sessions end. The lock survives a daemon
    /// restart.
    #[command(after_help = "\
The profile needs a passcode first (`profile passcode set NAME`). Exit status 4 for a refusal
(a wrong passcode, an attempt made before its wait), 3 for an unknown profile.")]
    Lock {
        /// Profile name.
        name: String,
    },
    /// Unlock a locked profile with its passcode (a guest the lock paused runs again).
    #[command(after_help = "\
The passcode is read from the terminal without echo, else the first line of stdin, or of
--passcode-file. After 3 failed attempts each further attempt waits (1 s, doubling to 300 s,
counted from the last failure and kept across daemon restarts); one made sooner is refused
without being tried. A refusal exits with status 4.")]
    Unlock {
        /// Profile name.
        name: String,
        /// Read the passcode from the first line of FILE (tests, scripts).
        #[arg(long, value_name = "FILE")]
        passcode_file: Option<PathBuf>,
    },
    /// Wipe a profile: its VMM ended if it runs, its data key destroyed (overwritten, then
    /// removed), then all its files deleted. Irreversible.
    #[command(after_help = "\
For a profile encrypted at rest (created with --encrypt) the wipe is a crypto-erase: a copy of
its disks taken before no longer opens on this handset. A plain profile's files are only
deleted (a copy taken before stays readable); the output says which. A daemon killed during a
wipe finishes it at its next start. An exported .pvp file carries its own copy of the key.")]
    Wipe {
        /// Profile name.
        name: String,
    },
    /// A profile's passcode (what unlocks it).
    Passcode {
        #[command(subcommand)]
        cmd: PasscodeCmd,
    },
    /// Delete a stopped or failed profile with its disks.
    #[command(after_help = "\
A running or paused profile must be stopped first. A suspended profile is refused unless
--force is given: its saved guest and its disks would be lost.")]
    Delete {
        /// Profile name.
        name: String,
        /// Also delete a suspended profile, discarding its saved guest.
        #[arg(long)]
        force: bool,
    },
    /// Bring a running profile to the foreground (the others go to the background).
    #[command(after_help = "\
The profile in front gets its foreground CPU weight (the others their background weight;
those with background = \"pause\" are paused) and is what the device screen (`profile view
--device`) shows under the host's status bar, with the device's keys and touches.

An offloaded profile (`profile offload`) with a screen can be switched to as well: the device
screen then shows its twin's screen, relayed from the cloud host, and the device's input goes
to the twin; nothing of it runs here, so no CPU weight is set. One without a screen is refused
while offloaded (`profile return NAME` first).

EXAMPLE:
  pocketvisor profile switch work    # work is in the foreground (0.4 ms)")]
    Switch {
        /// Profile name.
        name: String,
    },
    /// Save what a running profile's screen shows (spec `screen = true`) as PNG or PPM.
    #[command(after_help = "\
The format follows the file name: .png (8-bit RGB) or .ppm (binary P6); an existing file is
replaced (temp file, fsync, rename).

EXAMPLE:
  pocketvisor profile screenshot work -o work.png")]
    Screenshot {
        /// Profile name.
        name: String,
        /// Where the image goes (.png or .ppm).
        #[arg(short, long, value_name = "FILE")]
        output: std::path::PathBuf,
    },
    /// Print where a running profile's screen (spec `screen = true`) can be viewed live (VNC
    /// and the browser phone).
    #[command(after_help = "\
Prints a VNC address on loopback (RFB 3.8, no authentication: it is never bound wider), which
the daemon forwards to the profile's VMM; keys and the left mouse button reach the profile's
keyboard and touch screen. Any VNC client works.

Also prints the browser phone's address (unless the daemon runs with --http off): a web page
with the foreground profile's live screen, a profile switcher and each profile's state; the
address carries the daemon's token (new at each daemon start), so keep it to yourself.

EXAMPLE:
  pocketvisor profile view work      # work: vnc 127.0.0.1:41234
                                     # work: phone http://127.0.0.1:40123/phone?token=...
  vncsnapshot 127.0.0.1::41234 work.jpg

With --device instead of a NAME: the device screen, what the handset itself shows: the
foreground profile's screen under a status bar only the host draws (the profile's name and
colour; no guest can paint over it), following `profile switch`. Keys and the pointer of its
viewers go to the profile in front (a touch on the bar reaches none); a locked profile shows
only the bar.
  pocketvisor profile view --device  # device: vnc 127.0.0.1:41300 (180x330)")]
    View {
        /// Profile name.
        #[arg(required_unless_present = "device", conflicts_with = "device")]
        name: Option<String>,
        /// The device screen (the foreground profile under the host's status bar).
        #[arg(long)]
        device: bool,
    },
    /// Show a profile's lifecycle events (all profiles' without NAME).
    Events {
        /// Profile name.
        name: Option<String>,
        /// At most this many, the newest.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Keep printing new events as they happen (until Ctrl-C or the daemon stops), from
        /// the daemon's event stream (GET /v1/events/stream, server-sent events).
        #[arg(short, long)]
        follow: bool,
    },
    /// Attach to a running profile's serial console (type into the guest; Ctrl-] detaches).
    #[command(after_help = "\
The recent output (the tail of the serial log, --history bytes) comes first, then the guest's
output as it is printed. On a terminal every key goes to the guest (Ctrl-C too) and Ctrl-]
detaches; the terminal is restored however the console ends. With stdin not a terminal its
bytes are sent as they are and, at its end, the console exits once the guest has printed
nothing for --drain-ms (after --drain-max-ms at the latest, for a guest that never stops
printing). One console per profile at a time: a second is refused while one is attached. The console closes when the profile stops, is suspended or restarts.

EXAMPLES:
  pocketvisor profile console work
  printf 'uname -a\\n' | pocketvisor profile console work --history 0")]
    Console {
        /// Profile name.
        name: String,
        /// Bytes of recent output (the serial log's tail) to show first.
        #[arg(long, value_name = "BYTES", default_value_t = handset::console::HISTORY_DEFAULT)]
        history: u64,
        /// Without a terminal: how long the guest must stay quiet after the end of stdin.
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        drain_ms: u64,
        /// Without a terminal: the longest the console stays after the end of stdin.
        #[arg(long, value_name = "MS", default_value_t = 10_000)]
        drain_max_ms: u64,
    },
    /// Print a profile's serial console log (or its VMM's log).
    #[command(after_help = "\
The guest's serial console goes to profiles/NAME/run/serial.log, the VMM's own output to
vmm.log next to it; when a profile (re)starts, the previous run's logs are kept as
serial.log.prev and vmm.log.prev (--previous). With -f the log is followed across restarts.")]
    Logs {
        /// Profile name.
        name: String,
        /// The VMM's log instead of the guest's serial console.
        #[arg(long)]
        vmm: bool,
        /// The previous run's log (kept when the profile restarted, e.g. after a crash).
        #[arg(long, conflicts_with = "follow")]
        previous: bool,
        /// Keep printing what is appended (until Ctrl-C).
        #[arg(short, long)]
        follow: bool,
    },
    /// Show the audit log (API actions and cross-profile transfers).
    Audit {
        /// At most this many, the newest.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show the daemon's state (cgroups, probe guest, foreground).
    Status,
    /// Show the signed IT policy in force for a profile.
    #[command(after_help = "\
The policy is verified again under the handset's trusted organisation key before it is shown;
`pocketvisor policy apply` sets it (see `pocketvisor policy --help` and docs/policy.md). The
daemon answers (GET /v1/profiles/NAME/policy); with no daemon running, DIR is read directly.
--json adds the screen rules in force and the trusted key's fingerprint.")]
    Policy {
        /// Profile name.
        name: String,
    },
    /// A profile's clipboard: set it, read it, copy it to another profile (through the
    /// guests' agents, if the channel rules allow).
    Clipboard {
        #[command(subcommand)]
        cmd: ClipboardCmd,
    },
    /// Push a file from the host into a profile's agent inbox, or pull one out (like
    /// `lxc file push/pull`), or bring one from its clone (if the channel rules allow).
    File {
        #[command(subcommand)]
        cmd: FileCmd,
    },
    /// Send a file from one profile's agent inbox to another's (if the policy allows).
    #[command(after_help = "\
Allowed when FROM's channels.files_to lists TO and TO's channels.files_from is absent or lists
FROM (templates: personal -> work only). Every attempt is in `pocketvisor profile audit`.")]
    SendFile {
        /// Source profile.
        #[arg(long)]
        from: String,
        /// Target profile.
        #[arg(long)]
        to: String,
        /// File name in the source's inbox (1-128 of A-Z a-z 0-9 . _ -).
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum ClipboardCmd {
    /// Copy FROM's clipboard to TO's.
    #[command(after_help = "\
Allowed when FROM's channels.clipboard_to lists TO and TO's channels.clipboard_from is absent or
lists FROM (templates: personal -> work only). Every attempt is in `pocketvisor profile audit`.")]
    Copy {
        /// Source profile.
        #[arg(long)]
        from: String,
        /// Target profile.
        #[arg(long)]
        to: String,
    },
    /// Put TEXT (or a file's content) on a profile's clipboard.
    #[command(after_help = HOST_RULES)]
    Set {
        /// Profile name.
        name: String,
        /// The text.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// Take the content from FILE (- for standard input) instead.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// MIME type (default text/plain).
        #[arg(long)]
        mime: Option<String>,
    },
    /// Print a profile's clipboard on standard output (--json: with its MIME type, size and
    /// SHA-256, the data in base64).
    #[command(after_help = HOST_RULES)]
    Get {
        /// Profile name.
        name: String,
    },
}

/// How the channel rules apply to the host (the `--help` of the host's own transfers).
const HOST_RULES: &str = "\
The host is the peer `host` in the profile's channel rules (its spec's, or its IT policy's):
data leaves the profile (get, pull) only if its channels.clipboard_to / files_to lists \"host\";
data enters it (set, push) unless its channels.clipboard_from / files_from is set without
\"host\". Templates: personal gives to and takes from the host, work only takes. A refusal
exits 4; every attempt is in `pocketvisor profile audit`. The profile must be running (a
background-paused one is resumed for the call) with its agent answering on vsock.";

#[derive(Subcommand, Debug)]
enum FileCmd {
    /// Copy the host file LOCAL into the profile's agent inbox as REMOTE.
    #[command(after_help = HOST_RULES)]
    Push {
        /// Profile name.
        name: String,
        /// The file on the host (- for standard input, then REMOTE is needed).
        local: PathBuf,
        /// Its name in the inbox (default: LOCAL's file name); 1-128 of A-Z a-z 0-9 . _ -.
        remote: Option<String>,
    },
    /// Copy the inbox file REMOTE out of the profile to LOCAL on the host.
    #[command(after_help = HOST_RULES)]
    Pull {
        /// Profile name.
        name: String,
        /// The file's name in the inbox.
        remote: String,
        /// Where it goes (default ./REMOTE; a directory: DIR/REMOTE). Written through a
        /// temporary file beside it and renamed: a symlink there is replaced, not followed.
        local: Option<PathBuf>,
        /// Replace LOCAL if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Bring the file REMOTE from the agent inbox of the profile's clone (`profile clone`)
    /// into the profile's own inbox.
    #[command(name = "from-clone", after_help = CLONE_RULES)]
    FromClone(CloneFileArgs),
    /// Put the file REMOTE from the profile's own agent inbox into the inbox of its clone
    /// (`profile clone`): work handed to the twin.
    #[command(name = "to-clone", after_help = CLONE_RULES)]
    ToClone(CloneFileArgs),
}

/// The arguments of `file from-clone` and `file to-clone`.
#[derive(Args, Debug)]
struct CloneFileArgs {
    /// Profile name (the original, running here).
    name: String,
    /// The file's name in the inbox it leaves (the clone's with from-clone, the profile's
    /// with to-clone).
    remote: String,
    /// Its name in the inbox it enters (default: REMOTE; a file of that name is replaced);
    /// 1-128 of A-Z a-z 0-9 . _ -.
    #[arg(long = "as", value_name = "NEWNAME")]
    as_name: Option<String>,
}

/// How files move between a profile and its clone (the `--help` of `file from-clone` and
/// `file to-clone`).
const CLONE_RULES: &str = "\
The clone is the one the last successful `pocketvisor profile clone NAME --to HOST:PORT` started;
the daemon reaches its agent for this call only (`pocketvisor cloud vsock` with the identity in
<state-dir>/cloud/, on a socket in the profile's directory, removed afterwards). The clone
is the peer `cloud` in the profile's channel rules (its spec's, or its IT policy's), as the
host is `host`: a file comes from the clone unless channels.files_from is set without
\"cloud\"; it goes to the clone only if channels.files_to lists \"cloud\". A locked profile
refuses. A refusal exits 4; every attempt is in `pocketvisor profile audit` (channel-file,
from=cloud or to=cloud). Both agents must answer on vsock: the profile running here (a
background-paused one is resumed for the call), its clone at the host.

EXAMPLE:
  pocketvisor profile clone work --to cloud.example:7000
  pocketvisor profile file from-clone work report.pdf --as report-from-cloud.pdf
  pocketvisor profile set work 'channels.files_to=[\"cloud\"]'
  pocketvisor profile file to-clone work task.json";

/// `KEY=VALUE` arguments as a JSON object (`a.b=v` nests; a VALUE that parses as JSON is
/// taken as such, else as a string).
fn settings_object(settings: &[String]) -> Result<serde_json::Map<String, serde_json::Value>> {
    use serde_json::{Map, Value};
    let mut out = Map::new();
    for s in settings {
        let (key, value) = s
            .split_once('=')
            .with_context(|| format!("{s:?} is not KEY=VALUE"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
        let mut parts = key.split('.').peekable();
        let mut slot = &mut out;
        while let Some(part) = parts.next() {
            anyhow::ensure!(!part.is_empty(), "{key:?}: an empty key");
            if parts.peek().is_none() {
                anyhow::ensure!(
                    slot.insert(part.to_string(), value.clone()).is_none(),
                    "{key} is given twice"
                );
                break;
            }
            let next = slot
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            slot = next
                .as_object_mut()
                .with_context(|| format!("{key}: {part} is given as a value too"))?;
        }
    }
    Ok(out)
}

/// Prints a finished transfer.
/// Prints one clipboard or file transfer (JSON with `json`).
pub(crate) fn print_transfer(t: &handset::channels::Transfer, json: bool) -> Result<()> {
    if json {
        return print_json(t);
    }
    let what = match (&t.name, &t.mime) {
        (Some(n), _) => format!("file {n}"),
        (None, Some(m)) => format!("clipboard ({m})"),
        (None, None) => t.kind.as_str().to_string(),
    };
    outln!(
        "{what}: {} bytes from {} to {} ({} ms, sha256 {})",
        t.bytes,
        t.from,
        t.to,
        t.ms,
        t.sha256
    );
    Ok(())
}

fn client(a: &ProfileArgs) -> Result<Client> {
    let socket = match &a.socket {
        Some(s) => s.clone(),
        None => handset::StateDir::resolve(a.state_dir.as_deref())?.socket(),
    };
    Ok(Client::new(&socket))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn table(rows: &[ProfileInfo]) {
    outln!(
        "{:<20} {:<10} {:<3} {:>8} {:>7} {:>5} {:>9} {:>6}  {:<9} DETAIL",
        "NAME",
        "STATE",
        "FG",
        "PID",
        "MEM",
        "VCPUS",
        "RSS",
        "WEIGHT",
        "AGENT"
    );
    for p in rows {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        outln!(
            "{:<20} {:<10} {:<3} {:>8} {:>6}M {:>5} {:>9} {:>6}  {:<9} {}",
            p.name,
            p.state.as_str(),
            if p.foreground { "*" } else { "" },
            opt(p.pid.map(|v| v.to_string())),
            p.spec.memory_mib,
            p.spec.vcpus,
            opt(p.rss_kib.map(|k| format!("{}M", k / 1024))),
            opt(p.cpu_weight.map(|v| v.to_string())),
            opt(p
                .agent
                .as_ref()
                .map(|a| format!("{} v{}", a.kind, a.version))),
            detail(p)
        );
    }
}

/// The DETAIL column: the state's detail, whether the profile is locked (beyond a paused
/// one's `locked` detail) and whether an export moved it away.
fn detail(p: &ProfileInfo) -> String {
    let mut parts: Vec<String> = Vec::new();
    if !p.detail.is_empty() {
        parts.push(p.detail.clone());
    }
    if p.locked && p.detail != handset::lock::LOCK_PAUSED {
        parts.push("locked".into());
    }
    if let Some(f) = &p.moved_to {
        parts.push(format!("moved to {f}"));
    }
    if let Some(to) = &p.offloaded_to {
        if !p.detail.contains(to.as_str()) {
            parts.push(format!("offloaded to {to}"));
        }
    }
    parts.join("; ")
}

fn show(p: &ProfileInfo, r: &handset::api_types::ReplicationStatus) -> Result<()> {
    table(std::slice::from_ref(p));
    outln!(
        "\nserial log: {}\nvsock cid:  {}\nclone at:   {}\nreplicated: {}\nagent:      {}\n",
        p.serial_log,
        p.vsock_cid,
        p.cloned_to.as_deref().unwrap_or("-"),
        crate::replica::describe_replication(r),
        match (&p.agent, p.pid) {
            (Some(a), _) => format!("{} (agent protocol v{})", a.kind, a.version),
            (None, Some(_)) => "none answering on vsock port 1025".into(),
            (None, None) => "- (no VMM)".into(),
        }
    );
    out!("{}", toml::to_string(&p.spec)?);
    Ok(())
}

fn events(list: &[Event], header: bool) {
    if header {
        outln!(
            "{:<24} {:<20} {:<16} DETAIL",
            "TIME (UTC)",
            "PROFILE",
            "EVENT"
        );
    }
    for e in list {
        outln!(
            "{:<24} {:<20} {:<16} {}",
            utc(e.time_ms),
            printable(&e.profile),
            printable(&e.event),
            printable(&e.detail)
        );
    }
}

/// `text` with its control characters escaped (`\u{1b}`, `\n`): records keep what clients
/// sent (a rejected name with escape sequences), the terminal must not interpret it.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `YYYY-MM-DD HH:MM:SS.mmm` (UTC) from ms since the epoch.
fn utc(ms: i64) -> String {
    format!(
        "{}.{:03}",
        crate::civil_time::utc_seconds(ms.div_euclid(1000)),
        ms.rem_euclid(1000)
    )
}

/// `POST /v1/profiles/NAME/ACTION[?QUERY]` and what it did.
fn lifecycle(c: &Client, json: bool, name: &str, action: &str, query: &str) -> Result<()> {
    lifecycle_with(c, json, name, action, query, None::<&()>)
}

/// [`lifecycle`] with a JSON body.
fn lifecycle_with(
    c: &Client,
    json: bool,
    name: &str,
    action: &str,
    query: &str,
    body: Option<&impl serde::Serialize>,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    let p: ProfileInfo = c.call(
        "POST",
        &format!("/v1/profiles/{name}/{action}{query}"),
        body,
    )?;
    if json {
        return print_json(&p);
    }
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    match action {
        "switch" => outln!("{name} is in the foreground ({ms:.1} ms)"),
        "offload" => outln!(
            "{name}: offloaded to {} ({ms:.1} ms)",
            p.offloaded_to.as_deref().unwrap_or("?")
        ),
        "clone" => outln!(
            "{name}: {} here, its clone at the cloud host ({ms:.1} ms)",
            p.state.as_str()
        ),
        _ => outln!(
            "{name}: {}{} ({ms:.1} ms)",
            p.state.as_str(),
            p.pid.map(|v| format!(", pid {v}")).unwrap_or_default()
        ),
    }
    Ok(())
}

/// Runs one `profile` subcommand.
pub fn main(a: ProfileArgs) -> Result<i32> {
    if let ProfileCmd::Recover(r) = a.cmd {
        let dir = handset::StateDir::resolve(a.state_dir.as_deref())?;
        return crate::replica::profile_recover(&dir, r);
    }
    if let ProfileCmd::Policy { name } = &a.cmd {
        handset::spec::check_name("profile name", name)?;
        return crate::policy::show_in_force(
            a.state_dir.as_deref(),
            a.socket.as_deref(),
            name,
            a.json,
        );
    }
    let c = client(&a)?;
    let json = a.json;
    let none: Option<&()> = None;
    match a.cmd {
        ProfileCmd::Create {
            name,
            template,
            file,
            kernel,
            initrd,
            cmdline,
            firmware,
            disk_image,
            encrypt,
            managed,
        } => {
            let req = match (template, file) {
                (Some(t), None) => CreateProfile {
                    name: Some(name.context("a NAME is needed with --template")?),
                    template: Some(t),
                    kernel,
                    initrd,
                    cmdline,
                    firmware,
                    disk_image,
                    spec: None,
                    encrypt_at_rest: encrypt,
                    managed,
                },
                (None, Some(f)) => {
                    let text = std::fs::read_to_string(&f)
                        .with_context(|| format!("cannot read {}", f.display()))?;
                    let spec = ProfileSpec::from_toml(&text)
                        .with_context(|| format!("{}", f.display()))?;
                    CreateProfile {
                        name,
                        template: None,
                        kernel,
                        initrd,
                        cmdline,
                        firmware,
                        disk_image,
                        spec: Some(spec),
                        encrypt_at_rest: encrypt,
                        managed,
                    }
                }
                _ => anyhow::bail!("give --template work|personal or --file SPEC.toml"),
            };
            let p: ProfileInfo = c.call("POST", "/v1/profiles", Some(&req))?;
            if json {
                print_json(&p)?;
            } else {
                match &p.spec.firmware {
                    Some(f) => outln!("created profile {} (firmware {f})", p.name),
                    None => outln!("created profile {} (kernel {})", p.name, p.spec.kernel),
                }
            }
        }
        ProfileCmd::List => {
            let list: Vec<ProfileInfo> = c.call("GET", "/v1/profiles", none)?;
            if json {
                print_json(&list)?;
            } else {
                table(&list);
            }
        }
        ProfileCmd::Show { name } => {
            let p: ProfileInfo = c.call("GET", &format!("/v1/profiles/{name}"), none)?;
            if json {
                print_json(&p)?;
            } else {
                let r: handset::api_types::ReplicationStatus =
                    c.call("GET", &format!("/v1/profiles/{name}/replicate"), none)?;
                show(&p, &r)?;
            }
        }
        ProfileCmd::Delete { name, force } => {
            let query = if force { "?force=true" } else { "" };
            let _: () = c.call("DELETE", &format!("/v1/profiles/{name}{query}"), none)?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }))?;
            } else {
                outln!("deleted profile {name}");
            }
        }
        ProfileCmd::Set { name, settings } => {
            let changes = settings_object(&settings)?;
            let p: ProfileInfo =
                c.call("PATCH", &format!("/v1/profiles/{name}"), Some(&changes))?;
            if json {
                print_json(&p)?;
            } else {
                outln!("{name}: changed {}", settings.join(" "));
                if p.pid.is_some() || p.state == handset::ProfileState::Suspended {
                    outln!("(the running or saved guest keeps its settings until it is stopped and started)");
                }
            }
        }
        ProfileCmd::Start { name, reclaim } => {
            let query = if reclaim { "?reclaim=true" } else { "" };
            lifecycle(&c, json, &name, "start", query)?
        }
        ProfileCmd::Stop { name, discard } => {
            let query = if discard { "?discard=true" } else { "" };
            lifecycle(&c, json, &name, "stop", query)?
        }
        ProfileCmd::Suspend { name } => lifecycle(&c, json, &name, "suspend", "")?,
        ProfileCmd::Offload { name, to } => {
            let body = handset::api_types::OffloadRequest { to };
            lifecycle_with(&c, json, &name, "offload", "", Some(&body))?
        }
        ProfileCmd::Replicate(r) => crate::replica::profile_replicate(&c, json, r)?,
        // Served above, without the daemon.
        ProfileCmd::Recover(_) => {
            unreachable!("profile recover is served before")
        }
        ProfileCmd::Return { name } => lifecycle(&c, json, &name, "return", "")?,
        ProfileCmd::Clone { name, to } => {
            let body = handset::api_types::OffloadRequest { to };
            lifecycle_with(&c, json, &name, "clone", "", Some(&body))?
        }
        ProfileCmd::Resume { name, reclaim } => {
            let query = if reclaim { "?reclaim=true" } else { "" };
            lifecycle(&c, json, &name, "resume", query)?
        }
        ProfileCmd::Switch { name } => lifecycle(&c, json, &name, "switch", "")?,
        ProfileCmd::Pause { name } => lifecycle(&c, json, &name, "pause", "")?,
        ProfileCmd::Unpause { name } => lifecycle(&c, json, &name, "unpause", "")?,
        ProfileCmd::Wipe { name } => {
            let w: handset::daemon::wipe::Wiped =
                c.call("POST", &format!("/v1/profiles/{name}/wipe"), none)?;
            if json {
                print_json(&w)?;
            } else if w.crypto_erased {
                outln!("{name} wiped: its data key destroyed, its files deleted");
            } else {
                outln!(
                    "{name} wiped: its files deleted (it was not encrypted at rest: a copy \
                     taken before stays readable)"
                );
            }
        }
        ProfileCmd::Lock { name } => {
            let p: ProfileInfo = c.call("POST", &format!("/v1/profiles/{name}/lock"), none)?;
            if json {
                print_json(&p)?;
            } else {
                outln!("{name} is locked ({})", p.state.as_str());
            }
        }
        ProfileCmd::Unlock {
            name,
            passcode_file,
        } => {
            let body = handset::api_types::Passcode {
                passcode: read_passcode(passcode_file.as_deref(), false)?,
            };
            let p: ProfileInfo =
                c.call("POST", &format!("/v1/profiles/{name}/unlock"), Some(&body))?;
            if json {
                print_json(&p)?;
            } else {
                outln!("{name} is unlocked ({})", p.state.as_str());
            }
        }
        ProfileCmd::Passcode {
            cmd:
                PasscodeCmd::Set {
                    name,
                    passcode_file,
                },
        } => {
            let body = handset::api_types::Passcode {
                passcode: read_passcode(passcode_file.as_deref(), true)?,
            };
            let _: serde_json::Value =
                c.call("PUT", &format!("/v1/profiles/{name}/passcode"), Some(&body))?;
            if json {
                print_json(&serde_json::json!({"name": name, "passcode": "set"}))?;
            } else {
                outln!("{name}: passcode set");
            }
        }
        ProfileCmd::Screenshot { name, output } => {
            crate::screenshot::ImageFormat::for_path(&output)?;
            let answer: serde_json::Value =
                c.call("GET", &format!("/v1/profiles/{name}/screenshot"), none)?;
            let shot = crate::screenshot::Shot::from_value(&answer)?;
            shot.save(&output)?;
            if json {
                print_json(&serde_json::json!({
                    "name": name,
                    "width": shot.width,
                    "height": shot.height,
                    "output": output,
                }))?;
            } else {
                outln!(
                    "{name}: screenshot {}x{} written to {}",
                    shot.width,
                    shot.height,
                    output.display()
                );
            }
        }
        ProfileCmd::View { name: None, .. } => {
            let answer: serde_json::Value = c.call("GET", "/v1/device/view", none)?;
            if json {
                print_json(&answer)?;
            } else {
                let field = |k: &str| answer.get(k).cloned().unwrap_or_default();
                outln!(
                    "device: vnc {} ({}x{})",
                    field("vnc").as_str().unwrap_or("?"),
                    field("width"),
                    field("height")
                );
            }
        }
        ProfileCmd::View {
            name: Some(name), ..
        } => {
            let answer: serde_json::Value =
                c.call("GET", &format!("/v1/profiles/{name}/view"), none)?;
            if json {
                print_json(&answer)?;
            } else {
                let vnc = answer.get("vnc").and_then(|v| v.as_str()).unwrap_or("?");
                outln!("{name}: vnc {vnc}");
                if let Some(url) = answer.get("phone").and_then(|v| v.as_str()) {
                    outln!("{name}: phone {url}");
                }
            }
        }
        ProfileCmd::Events {
            name,
            limit,
            follow,
        } => {
            // A profile's history, also after it was deleted; a name with none at all (never
            // created) is "not found".
            let url = match &name {
                Some(n) => {
                    handset::spec::check_name("profile name", n)?;
                    format!("/v1/events?limit={limit}&profile={n}")
                }
                None => format!("/v1/events?limit={limit}"),
            };
            let list: Vec<Event> = c.call("GET", &url, none)?;
            if let (Some(n), true) = (&name, list.is_empty()) {
                let _: ProfileInfo = c.call("GET", &format!("/v1/profiles/{n}"), none)?;
            }
            // Followed, every event is one line (one JSON object per line with --json).
            let show = |list: &[Event], header: bool| -> Result<()> {
                if json && follow {
                    for e in list {
                        outln!("{}", serde_json::to_string(e)?);
                    }
                    Ok(())
                } else if json {
                    print_json(&list)
                } else {
                    events(list, header);
                    Ok(())
                }
            };
            show(&list, true)?;
            if follow {
                let last = list.last().map_or(0, |e| e.id);
                crate::follow::events(&c, name.as_deref(), last, |e| {
                    let _ = show(std::slice::from_ref(e), false);
                })?;
            }
        }
        ProfileCmd::Console {
            name,
            history,
            drain_ms,
            drain_max_ms,
        } => {
            let drain = crate::console::Drain {
                quiet: std::time::Duration::from_millis(drain_ms),
                max: std::time::Duration::from_millis(drain_max_ms),
            };
            return crate::console::attach(&c, &name, history, drain);
        }
        ProfileCmd::Logs {
            name,
            vmm,
            previous,
            follow,
        } => {
            let p: ProfileInfo = c.call("GET", &format!("/v1/profiles/{name}"), none)?;
            let serial = std::path::PathBuf::from(&p.serial_log);
            let file = match (vmm, previous) {
                (false, false) => serial,
                (false, true) => serial.with_file_name("serial.log.prev"),
                (true, false) => serial.with_file_name("vmm.log"),
                (true, true) => serial.with_file_name("vmm.log.prev"),
            };
            if !follow && !file.exists() {
                return Err(crate::failure::Failure::NotFound(format!(
                    "profile {name:?} has no {} yet (it has not run{})",
                    file.display(),
                    if previous { " twice" } else { "" }
                ))
                .into());
            }
            crate::follow::cat(&file, follow)?;
        }
        ProfileCmd::Audit { limit } => {
            let list: Vec<Event> = c.call("GET", &format!("/v1/audit?limit={limit}"), none)?;
            if json {
                print_json(&list)?;
            } else {
                events(&list, true);
            }
        }
        ProfileCmd::Clipboard {
            cmd: ClipboardCmd::Copy { from, to },
        } => {
            let req = handset::channels::ClipboardRequest { from, to };
            let t = c.call("POST", "/v1/channels/clipboard", Some(&req))?;
            print_transfer(&t, json)?;
        }
        ProfileCmd::Clipboard {
            cmd:
                ClipboardCmd::Set {
                    name,
                    text,
                    file,
                    mime,
                },
        } => crate::guest_data::clipboard_set(&c, json, &name, text, file, mime)?,
        ProfileCmd::Clipboard {
            cmd: ClipboardCmd::Get { name },
        } => crate::guest_data::clipboard_get(&c, json, &name)?,
        ProfileCmd::File {
            cmd:
                FileCmd::Push {
                    name,
                    local,
                    remote,
                },
        } => crate::guest_data::push(&c, json, &name, &local, remote)?,
        ProfileCmd::File {
            cmd:
                FileCmd::Pull {
                    name,
                    remote,
                    local,
                    force,
                },
        } => crate::guest_data::pull(&c, json, &name, &remote, local, force)?,
        ProfileCmd::File {
            cmd: FileCmd::FromClone(a),
        } => crate::guest_data::with_clone(
            &c,
            json,
            a.name,
            a.remote,
            a.as_name,
            CloneDirection::FromClone,
        )?,
        ProfileCmd::File {
            cmd: FileCmd::ToClone(a),
        } => crate::guest_data::with_clone(
            &c,
            json,
            a.name,
            a.remote,
            a.as_name,
            CloneDirection::ToClone,
        )?,
        ProfileCmd::SendFile { from, to, name } => {
            let req = handset::channels::FileRequest { from, to, name };
            let t = c.call("POST", "/v1/channels/file", Some(&req))?;
            print_transfer(&t, json)?;
        }
        // Answered above without the daemon; kept here so the match stays exhaustive.
        ProfileCmd::Policy { name } => {
            return crate::policy::show_in_force(
                a.state_dir.as_deref(),
                a.socket.as_deref(),
                &name,
                json,
            )
        }
        ProfileCmd::Status => {
            let info: handset::DaemonInfo = c.call("GET", "/v1/handset", none)?;
            if json {
                print_json(&info)?;
            } else {
                outln!("daemon pid {} version {}", info.pid, info.version);
                outln!("state dir  {}", info.state_dir);
                outln!(
                    "cgroups    {} {}{}",
                    info.cgroups.mode,
                    info.cgroups.path.unwrap_or_default(),
                    info.cgroups
                        .note
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                );
                outln!(
                    "probe      {}",
                    info.probe.unwrap_or_else(|| "not installed".into())
                );
                outln!("profiles   {} ({} running)", info.profiles, info.running);
                outln!(
                    "foreground {}",
                    info.foreground.unwrap_or_else(|| "-".into())
                );
                outln!(
                    "phone      {}",
                    info.phone
                        .unwrap_or_else(|| "off (handset --http off)".into())
                );
                if let Some(m) = info.mdm {
                    outln!(
                        "mdm        {} {} (device {}){}",
                        m.server,
                        m.state,
                        m.device_id.as_deref().unwrap_or("-"),
                        m.detail.map(|d| format!(": {d}")).unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn settings_become_one_nested_object() {
        let args: Vec<String> = [
            "memory_mib=512",
            "cmdline=console=ttyS0 quiet",
            "cpu.foreground=300",
            "cpu.background=50",
            "channels.clipboard_to=[\"work\"]",
            "autostart=true",
            "on_shutdown=stop",
        ]
        .map(String::from)
        .to_vec();
        let v = serde_json::Value::Object(super::settings_object(&args).unwrap());
        assert_eq!(
            v,
            serde_json::json!({"memory_mib": 512, "cmdline": "console=ttyS0 quiet",
                "cpu": {"foreground": 300, "background": 50},
                "channels": {"clipboard_to": ["work"]}, "autostart": true, "on_shutdown": "stop"})
        );
        for bad in [
            &["memory_mib"][..],
            &["a=1", "a=2"],
            &["cpu=1", "cpu.x=2"],
            &[".x=1"],
        ] {
            let bad: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
            assert!(super::settings_object(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(
            super::printable("a\u{1b}[2Jb\nc\u{7}"),
            "a\\u{1b}[2Jb\\nc\\u{7}"
        );
        assert_eq!(super::printable("work: ok é"), "work: ok é");
    }
}
