//! Linux on the display devices, in L1 (issue 11): Debian's `virtio_gpu` DRM driver with fbcon
//! on it and `virtio_input`, on pocketvisor's virtio-gpu and virtio-input. The console text the
//! guest writes shows up in the frame a VNC client reads, and keys the client types reach the
//! guest's console. The guest is `guest/out/linux-gpu` (Debian's generic kernel: the cloud
//! kernel of the other checks has no DRM), built by `make test-nested`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::linux::{assert_clean_kernel_log, field, linux_line};
use e2e::rfb_client::RfbClient;
use e2e::{RunningVm, VmCommand};

use super::{check, LINUX_TIMEOUT};

const W: u16 = 640;
const H: u16 = 480;
/// The reverse-video bar the guest draws at the start of row 2: 24 cells.
const BAR_CELLS: usize = 24;

fn linux_gpu_dir() -> PathBuf {
    e2e::workspace_root().join("guest/out/linux-gpu")
}

/// The first line starting with `LINUX <prefix>` within LINUX_TIMEOUT, or a failure showing the
/// serial output so far.
fn wait_linux(vm: &mut RunningVm, prefix: &str) -> String {
    let want = format!("LINUX {prefix}");
    match vm.wait_for_line(LINUX_TIMEOUT, |l| l.contains(&want)) {
        Some((_, line)) => line[line.find(&want).unwrap_or(0)..].to_string(),
        None => panic!(
            "no `{want}`\nserial:\n{}\nstderr: {}",
            vm.drain(),
            vm.stderr_so_far()
        ),
    }
}

/// Where the guest's bar is: the top row `y` and its width and height in pixels, if the frame
/// has a solid non-black run starting at x = 0 whose top is on a black row.
fn find_bar(frame: &[u8]) -> Option<(usize, usize, usize)> {
    let (w, h) = (usize::from(W), usize::from(H));
    let px = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        [frame[i], frame[i + 1], frame[i + 2]]
    };
    let top = (1..h).find(|&y| px(0, y) != [0; 3] && px(0, y - 1) == [0; 3])?;
    let colour = px(0, top);
    let width = (0..w).take_while(|&x| px(x, top) == colour).count();
    let height = (top..h)
        .take_while(|&y| (0..width).all(|x| px(x, y) == colour))
        .count();
    Some((top, width, height))
}

/// Lit (non-black) pixels in the rectangle.
fn lit(frame: &[u8], x0: usize, y0: usize, w: usize, h: usize) -> usize {
    let stride = usize::from(W);
    (y0..y0 + h)
        .flat_map(|y| (x0..x0 + w).map(move |x| (y * stride + x) * 3))
        .filter(|&i| frame[i..i + 3] != [0; 3])
        .count()
}

/// Full frames until `pred` holds on one (fbcon draws from a deferred worker), at most 60 s.
fn frame_where(client: &mut RfbClient, what: &str, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let frame = client.full_frame();
        if pred(&frame) {
            return frame;
        }
        assert!(Instant::now() < deadline, "no frame with {what} in 60 s");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The VNC half: the guest's bar and text in a full frame, then keys typed to its console.
fn over_vnc(vm: &mut RunningVm) {
    let stderr = vm.stderr_so_far();
    let port: u16 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("pocketvisor: VNC server on 127.0.0.1:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VNC address printed: {stderr}"));
    let mut client = RfbClient::connect(port);
    assert_eq!((client.width, client.height), (W, H));

    // The bar: 24 cells wide, one cell high, on row 2 (two cell heights down).
    let frame = frame_where(&mut client, "the guest's bar", |f| {
        find_bar(f).is_some_and(|(_, w, _)| w % BAR_CELLS == 0 && w >= BAR_CELLS * 6)
    });
    let (top, width, height) = find_bar(&frame).expect("found above");
    let cell_w = width / BAR_CELLS;
    assert!(
        (6..=16).contains(&cell_w) && (8..=32).contains(&height),
        "a bar of {width}x{height} is not 24 console cells"
    );
    assert_eq!(top, 2 * height, "the bar is on row 2 ({width}x{height})");
    // "pocketvisor" on the next row: text, neither blank nor a solid block.
    let text = lit(&frame, 0, top + height, 11 * cell_w, height);
    assert!(
        text > 11 * 4 && text < 11 * cell_w * height / 2,
        "row 3 should hold the word pocketvisor: {text} lit pixels"
    );
    // Nothing was typed yet: row 4 is blank.
    let row4 = top + 2 * height;
    assert_eq!(lit(&frame, 0, row4, 4 * cell_w, height), 0);

    // Type "pv" through VNC: the console echoes it on row 4; then Return, and init reads the
    // line (and goes on to power off).
    let type_keys = |client: &mut RfbClient, keysyms: &[u32]| {
        for &keysym in keysyms {
            client.key(keysym, true);
            client.key(keysym, false);
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    type_keys(&mut client, &[u32::from(b'p'), u32::from(b'v')]);
    frame_where(&mut client, "the echoed keys on row 4", |f| {
        lit(f, 0, row4, 2 * cell_w, height) > 8
    });
    type_keys(&mut client, &[0xff0d]);
    let typed = wait_linux(vm, "typed");
    assert_eq!(field(&typed, "line"), Some("pv"), "{typed}");
}

#[test]
fn linux_fbcon_on_virtio_gpu_shows_over_vnc_and_vnc_keys_reach_its_console() {
    check(
        "screen::linux_fbcon_on_virtio_gpu_shows_over_vnc_and_vnc_keys_reach_its_console",
        || {
            let dir = linux_gpu_dir();
            assert!(
                dir.join("vmlinux").is_file(),
                "{} is not built: make test-nested builds it (guest/build-linux.sh with \
                 KERNEL_PKG=linux-image-amd64 EXTRA_MODULES=virtio_gpu)",
                dir.display()
            );
            let mut cmd = VmCommand::bare()
                .memory("512M")
                .vcpus(2)
                .timeout(LINUX_TIMEOUT)
                .arg(&format!("--gpu={W}x{H}"))
                .arg("--input")
                .arg("--vnc=127.0.0.1:0");
            cmd.kernel = Some(dir.join("vmlinux"));
            cmd.initrd = Some(dir.join("initramfs.cpio.gz"));
            cmd.cmdline = Some("console=ttyS0 quiet logo.nologo pv.screen=1".into());
            // The VNC server's debug lines, for a failure message.
            let mut command = cmd.command();
            command.env("RUST_LOG", "rfb=debug,warn");
            let mut vm = RunningVm::spawn(command, LINUX_TIMEOUT);

            let fb = wait_linux(&mut vm, "fb ");
            assert!(
                field(&fb, "name").is_some_and(|n| n.contains("virtio")),
                "fbcon is not on virtio_gpu: {fb}"
            );
            assert_eq!(field(&fb, "size"), Some("640,480"), "{fb}");
            wait_linux(&mut vm, "screen drawn");
            let inputs: Vec<String> = vm
                .seen()
                .iter()
                .filter_map(|(_, l)| l.find("LINUX input ").map(|at| l[at..].to_string()))
                .collect();
            assert!(
                !inputs.is_empty(),
                "virtio_input registered no input device"
            );

            let vnc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| over_vnc(&mut vm)));
            if let Err(e) = vnc {
                let what = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!(
                    "{what}\nserial:\n{}\nVMM stderr:\n{}",
                    vm.drain(),
                    vm.stderr_so_far()
                );
            }
            let out = vm.wait();
            assert!(!out.timed_out, "{}", out.describe());
            assert!(linux_line(&out, "done").is_some(), "{}", out.describe());
            assert_clean_kernel_log(&out);
        },
    );
}
