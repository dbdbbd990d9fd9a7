//! Images move between QEMU and our VMM: an image formatted, checkpointed and crashed
//! (SIGKILL) under either restores under the other, with its workload intact.
//!
//! QEMU's q35 machine (SeaBIOS) reports less RAM than the image holds (firmware keeps the
//! top pages), our VMM all of it; the image's layout must not depend on that difference.
//! QEMU gets the image as its RAM (`memory-backend-file`, `share=on`) and boots the bundled
//! kernel with `-kernel` and a program with `-initrd`, as the README's QEMU section shows. The tests skip, saying so,
//! only where `qemu-system-x86_64` is not installed (`.ci/run` installs it).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{read_header, vmm_bin, Scratch};
use nvram::control::{BootKind, Operation, Verified};
use vmm::harness::run_then_crash;
use vmm::{ConsoleOutput, VmConfig};

const QEMU: &str = "qemu-system-x86_64";
/// The image's size: a whole number of MiB, as both sides take it.
const MEM_MIB: u64 = 64;
/// Generations committed before the crash.
const GENERATIONS: u64 = 3;
/// QEMU's q35 spends a few seconds in SeaBIOS (emulated kernel mode under PVM): generous.
const QEMU_LIMIT: Duration = Duration::from_secs(90);

/// Whether QEMU can run here; if not, says why (the test then skips).
fn qemu_runs() -> bool {
    match Command::new(QEMU).arg("--version").output() {
        Ok(out) if out.status.success() => true,
        _ => {
            eprintln!("skipped: {QEMU} is not installed (Debian's qemu-system-x86; .ci/run installs it)");
            false
        }
    }
}

/// QEMU on `image` as its RAM, booting the bundled kernel with `cmdline`, console to `log`.
/// QEMU booting the bundled kernel on the scratch image, with `program` (a bundled
/// program's name) as its one boot module (`-initrd`: QEMU hands over one module, without
/// a command line, so the program takes the kernel's command line as its arguments).
fn qemu(scratch: &Scratch, cmdline: &str, log: &Path, program: Option<&str>) -> Child {
    let kernel = scratch.path("kernel.elf");
    if !kernel.exists() {
        std::fs::write(&kernel, vmm::kernel::BUNDLED_KERNEL).expect("write the kernel out");
    }
    let mut initrd = Vec::new();
    if let Some(name) = program {
        let path = scratch.path(&format!("{name}.elf"));
        std::fs::write(&path, vmm::apps::embedded(name).expect("a bundled program").elf).expect("write it out");
        initrd = vec!["-initrd".to_string(), path.display().to_string()];
    }
    let backend = format!("memory-backend-file,id=mem,size={MEM_MIB}M,mem-path={},share=on", scratch.image().display());
    Command::new(QEMU)
        .args(["-M", "q35", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", &format!("{MEM_MIB}M")])
        .args(["-object", &backend, "-machine", "memory-backend=mem"])
        .args(["-kernel", &kernel.display().to_string()])
        .args(["-append", &vmm::vm::host_cmdline_quirks(cmdline)])
        .args(&initrd)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .args(["-display", "none", "-monitor", "none", "-serial", &format!("file:{}", log.display())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.path("qemu.err")).expect("QEMU's stderr file"))
        .spawn()
        .expect("spawn QEMU")
}

/// Waits for `child` (killed after `limit`, failing the test).
fn wait(mut child: Child, limit: Duration, log: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for QEMU") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU did not finish within {limit:?}; console:\n{}", read(log));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Formatted, checkpointed and killed under our VMM, the image restores under QEMU: the
/// console says so, and `kv` verifies its whole table there.
#[test]
fn an_image_crashed_under_our_vmm_restores_under_qemu() {
    if !qemu_runs() {
        return;
    }
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    let ours = scratch.path("ours.log");
    let mut vmm = Command::new(vmm_bin())
        .args(["boot", "--nvram", &image, "--mem", &format!("{MEM_MIB}M"), "--console"])
        .arg(&ours)
        .args(["--cmdline", "apps=kv,counter kv_verify_every=1 checkpoint_ms=50"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let committed = Arc::new(Mutex::new(0u64));
    let seen = committed.clone();
    let stderr = vmm.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("write-out committed") {
                if let Some(g) = line.split("generation=").nth(1).and_then(|r| r.split_whitespace().next()) {
                    let mut seen = seen.lock().unwrap();
                    *seen = (*seen).max(g.parse().unwrap_or(0));
                }
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while *committed.lock().unwrap() < GENERATIONS {
        assert!(Instant::now() < deadline && !reader.is_finished(), "no write-outs committed:\n{}", read(&ours));
        thread::sleep(Duration::from_millis(5));
    }
    vmm.kill().expect("SIGKILL the VMM");
    vmm.wait().unwrap();
    reader.join().unwrap();
    let last = *committed.lock().unwrap();

    let log = scratch.path("qemu.log");
    // `kv` prints its verdict at every 20th report (one each 100 ms): the run must hold 20
    // of them after the restore, with room for a loaded host.
    let status = wait(qemu(&scratch, "run_ms=4000", &log, None), QEMU_LIMIT, &log);
    let console = read(&log);
    // isa-debug-exit: status (code << 1) | 1, and a power-off is code 0.
    let stderr = read(&scratch.path("qemu.err"));
    assert_eq!(status.code(), Some(1), "QEMU did not power off ({status}): {stderr}\nconsole:\n{console}");
    assert!(!console.contains("refusing this image"), "QEMU's boot refused the image:\n{console}");
    let restored = console
        .lines()
        .find_map(|l| l.strip_prefix("NVM: restored generation "))
        .and_then(|r| r.split(':').next())
        .and_then(|g| g.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("QEMU's boot did not restore:\n{console}"));
    assert!(restored >= last, "restored generation {restored} < last committed {last}:\n{console}");
    let after = console.split("NVM: restored generation").nth(1).unwrap();
    assert!(after.contains(", table verified"), "kv did not verify after the restore:\n{console}");
    assert!(!console.contains("FAILED"), "{console}");
}

/// Formatted, checkpointed and killed under QEMU, the image restores under our VMM, and
/// `kv` verifies there (through the machine-control device).
#[test]
fn an_image_crashed_under_qemu_restores_under_our_vmm() {
    if !qemu_runs() {
        return;
    }
    let scratch = Scratch::new();
    let log = scratch.path("qemu.log");
    let mut child = qemu(&scratch, "kv_verify_every=1 checkpoint_ms=50", &log, Some("kv"));
    // Under QEMU the image is the only witness: its root header counts the generations.
    let deadline = Instant::now() + QEMU_LIMIT;
    loop {
        let formatted = std::fs::metadata(scratch.image()).is_ok_and(|m| m.len() >= MEM_MIB << 20);
        if formatted && read_header(&scratch).generation >= GENERATIONS {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("QEMU exited ({status}) before {GENERATIONS} write-outs:\n{}", read(&log));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("QEMU committed no {GENERATIONS} write-outs within {QEMU_LIMIT:?}:\n{}", read(&log));
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.kill().expect("SIGKILL QEMU");
    child.wait().unwrap();
    let last = read_header(&scratch).generation;
    assert!(read(&log).contains("plate: first write-out committed"), "{}", read(&log));

    let mut config = VmConfig::new(scratch.image());
    config.mem_size = Some(MEM_MIB << 20);
    config.console = ConsoleOutput::File(scratch.console());
    let after = run_then_crash(&config, Duration::from_secs(30), |s| {
        s.boot_kind.is_some() && s.workloads.get("kv").is_some_and(|w| w.last_check != Verified::Unknown)
    });
    let console = scratch.read_console();
    assert_eq!(after.boot_kind, Some(BootKind::Restored), "{after:?}\nconsole:\n{console}");
    let restored = after.of(Operation::Restore).last().expect("the restore reported its metrics").report.generation;
    assert!(restored >= last, "restored generation {restored} < {last} committed under QEMU");
    assert_eq!(after.workloads["kv"].last_check, Verified::Passed, "{after:?}\nconsole:\n{console}");
}
