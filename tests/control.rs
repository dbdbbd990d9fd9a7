//! The control socket and `vmm ctl`: every command, every bad input, signals.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A VMM with a control socket, booted on the scratch image.
fn start(scratch: &Scratch, cmdline: &str) -> (Child, String) {
    start_with(scratch, cmdline, &[])
}

/// As [`start`], with more arguments for `vmm boot`.
fn start_with(scratch: &Scratch, cmdline: &str, extra: &[&str]) -> (Child, String) {
    let socket = scratch.path("vmm.sock").display().to_string();
    let mut args = boot_args(scratch, cmdline);
    args.extend(["--control".into(), socket.clone()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let child = vmm(&[]).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn vmm");
    wait_up(&socket);
    (child, socket)
}

/// Waits until the machine on `socket` is ready: its guest has said how it booted.
fn wait_up(socket: &str) {
    let deadline = Instant::now() + BOOT_LIMIT;
    loop {
        if let Ok(reply) = request(socket, r#"{"cmd":"status"}"#) {
            if !reply["boot_kind"].is_null() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the machine did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One raw request line, one reply.
fn request(socket: &str, line: &str) -> std::io::Result<Value> {
    let mut stream = UnixStream::connect(socket)?;
    writeln!(stream, "{line}")?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}

fn ctl(socket: &str, args: &[&str]) -> Finished {
    let mut all = vec!["ctl", "--socket", socket];
    all.extend(args);
    run(&mut vmm(&all), Duration::from_secs(20))
}

fn json(out: &Finished) -> Value {
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn every_command_works_through_vmm_ctl() {
    let scratch = Scratch::new();
    let (child, socket) = start(&scratch, "apps=kv,counter");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is private");

    let status = json(&ctl(&socket, &["--json", "status"]));
    assert_eq!(status["ok"], true);
    assert_eq!(status["state"], "running");
    assert_eq!(status["boot_kind"], "cold");
    assert!(status["uptime_ms"].as_u64().unwrap() > 0);

    let out = ctl(&socket, &["--json", "checkpoint"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let checkpoint = json(&out);
    let generation = checkpoint["write_out"]["generation"].as_u64().unwrap();
    assert!(generation >= 2, "{checkpoint}");
    assert!(checkpoint["write_out"]["phases_ms"]["copy"].is_number());
    let human = ctl(&socket, &["checkpoint"]);
    assert!(human.stdout.contains(&format!("committed generation {}", generation + 1)), "{human:?}");

    assert_eq!(json(&ctl(&socket, &["--json", "pause"]))["state"], "paused");
    assert_eq!(json(&ctl(&socket, &["--json", "status"]))["state"], "paused");
    let refused = ctl(&socket, &["checkpoint"]);
    assert_eq!(refused.code(), Some(1), "a paused machine cannot checkpoint: {refused:?}");
    assert!(refused.stderr.contains("paused"));
    assert_eq!(json(&ctl(&socket, &["--json", "resume"]))["state"], "running");

    let status = json(&ctl(&socket, &["--json", "status"]));
    assert!(status["committed_generation"].as_u64().unwrap() > generation);
    // kv reports its progress by heartbeats, which a loaded host may delay.
    let deadline = Instant::now() + BOOT_LIMIT;
    let status = loop {
        let status = json(&ctl(&socket, &["--json", "status"]));
        if status["workloads"]["kv"]["progress"].as_u64().is_some_and(|p| p > 0) {
            break status;
        }
        assert!(Instant::now() < deadline, "kv made no progress: {status}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status["workloads"]["kv"]["checksum"].is_string(), "{status}");

    let metrics = json(&ctl(&socket, &["--json", "metrics"]));
    assert!(metrics["write_outs"]["count"].as_u64().unwrap() >= 3, "{metrics}");
    for q in ["min_ms", "median_ms", "p99_ms", "max_ms"] {
        assert!(metrics["write_outs"][q].is_number(), "{metrics}");
    }
    assert!(metrics["bytes_copied"].as_u64().unwrap() > 0);
    // The write-outs' bytes went through the copy engine, which accounts for them.
    let engine = &metrics["engine"];
    assert!(engine["batches"].as_u64().unwrap() >= 3, "{metrics}");
    assert!(engine["bytes"].as_u64().unwrap() >= metrics["bytes_copied"].as_u64().unwrap(), "{metrics}");
    assert_eq!(engine["rejected"], 0, "{metrics}");
    assert!(ctl(&socket, &["metrics"]).stdout.contains("copy engine:"));

    let out = ctl(&socket, &["shutdown"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let vmm = wait(child, Duration::from_secs(20));
    assert_eq!(vmm.code(), Some(0), "{vmm:?}");
    assert!(vmm.stderr.contains("the guest powered off"), "{vmm:?}");
    assert!(!std::path::Path::new(&socket).exists(), "the socket file is removed");

    // The next boot resumes.
    let (child, socket) = start(&scratch, "");
    assert_eq!(json(&ctl(&socket, &["--json", "status"]))["boot_kind"], "resumed");
    assert_eq!(ctl(&socket, &["crash"]).code(), Some(0));
    let vmm = wait(child, Duration::from_secs(10));
    assert_eq!(vmm.code(), Some(7), "{vmm:?}");
}

#[test]
fn crash_stops_the_machine_dead_and_the_next_boot_restores() {
    let scratch = Scratch::new();
    let (child, socket) = start(&scratch, "apps=kv checkpoint_ms=200");
    let committed = json(&ctl(&socket, &["--json", "checkpoint"]))["write_out"]["generation"].as_u64().unwrap();
    let out = ctl(&socket, &["crash"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let vmm = wait(child, Duration::from_secs(10));
    assert_eq!(vmm.code(), Some(7), "{vmm:?}");
    assert!(vmm.stderr.contains("crashed on request"), "{vmm:?}");
    assert!(!vmm.stderr.contains("stopped by"), "no orderly stop after a crash: {vmm:?}");

    let (child, socket) = start(&scratch, "");
    let status = json(&ctl(&socket, &["--json", "status"]));
    assert_eq!(status["boot_kind"], "restored");
    assert!(status["committed_generation"].as_u64().unwrap() >= committed, "{status}");
    let metrics = json(&ctl(&socket, &["--json", "metrics"]));
    assert_eq!(metrics["restores"]["count"], 1, "{metrics}");
    ctl(&socket, &["crash"]);
    wait(child, Duration::from_secs(10));
}

#[test]
fn bad_input_gets_an_error_and_harms_nobody() {
    let scratch = Scratch::new();
    let (child, socket) = start(&scratch, "apps=counter");

    // A connection that stays open across bad requests.
    let mut stream = UnixStream::connect(&socket).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for bad in ["{\"cmd\":\"fly\"}", "not json", "{\"cmd\":\"status\",\"extra\":1}", "[1,2]", "{}"] {
        writeln!(stream, "{bad}").unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        let reply: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["ok"], false, "{bad}: {reply}");
        assert!(reply["error"].as_str().unwrap().contains("bad request"), "{reply}");
    }
    writeln!(stream, "{{\"cmd\":\"status\"}}").unwrap();
    let mut reply = String::new();
    reader.read_line(&mut reply).unwrap();
    assert!(reply.contains("\"ok\":true"), "the connection goes on: {reply}");

    // An over-long line: an error reply, then the connection is closed.
    let mut long = UnixStream::connect(&socket).unwrap();
    let junk = vec![b'x'; 10_000];
    let _ = long.write_all(&junk);
    let mut reply = String::new();
    let _ = BufReader::new(&long).read_line(&mut reply);
    assert!(reply.contains("longer than"), "{reply}");

    // A client that leaves mid-line.
    let mut half = UnixStream::connect(&socket).unwrap();
    half.write_all(b"{\"cmd\":\"sta").unwrap();
    drop(half);

    // Several clients at once.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || request(&socket, r#"{"cmd":"status"}"#).unwrap())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap()["ok"], true);
    }

    // The guest went on all along: its counter keeps advancing.
    let progress = || request(&socket, r#"{"cmd":"status"}"#).unwrap()["workloads"]["counter"]["progress"].as_u64();
    let deadline = Instant::now() + BOOT_LIMIT;
    let a = loop {
        if let Some(a) = progress() {
            break a;
        }
        assert!(Instant::now() < deadline, "no heartbeat from the counter");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    let b = progress().unwrap();
    assert!(b > a, "{a} then {b}");
    request(&socket, r#"{"cmd":"crash"}"#).unwrap();
    wait(child, Duration::from_secs(10));
}

#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let scratch = Scratch::new();
    let (child, socket) = start(&scratch, "");
    // A second VMM (another image) on the same socket path.
    let other = scratch.path("other.img").display().to_string();
    let out = run(
        &mut vmm(&["boot", "--nvram", &other, "--mem", "32M", "--control", &socket, "--cmdline", "poweroff"]),
        BOOT_LIMIT,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("another VMM is listening"), "{out:?}");
    request(&socket, r#"{"cmd":"crash"}"#).unwrap();
    wait(child, Duration::from_secs(10));

    // A socket file left by a dead VMM is replaced.
    let stale = scratch.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let stale = stale.display().to_string();
    let out = run(
        &mut vmm(&["boot", "--nvram", &other, "--mem", "32M", "--control", &stale, "--cmdline", "poweroff"]),
        BOOT_LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");

    // A path that is not a socket is not touched.
    let file = scratch.path("file");
    std::fs::write(&file, b"keep me").unwrap();
    let file = file.display().to_string();
    let out = run(&mut vmm(&["boot", "--nvram", &other, "--control", &file, "--cmdline", "poweroff"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("is not a socket"), "{out:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn ctl_without_a_machine_says_so() {
    let out = ctl("/nonexistent/vmm.sock", &["status"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("cannot reach a machine"), "{out:?}");
}

#[test]
fn ctrl_c_shuts_down_gracefully_and_a_second_one_crashes() {
    let scratch = Scratch::new();
    let (child, _socket) = start(&scratch, "apps=counter");
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = wait(child, Duration::from_secs(20));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains("the guest powered off"), "{out:?}");
    assert!(scratch.read_console().contains("shut down"), "{}", scratch.read_console());

    let (mut child, socket) = start(&scratch, "");
    // Paused, the guest cannot act on the first signal's shutdown request: it waits.
    request(&socket, r#"{"cmd":"pause"}"#).unwrap();
    let pid = child.id() as i32;
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "still up, paused, with the shutdown pending");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let out = wait(child, Duration::from_secs(20));
    assert_eq!(out.code(), Some(7), "the second signal crashes: {out:?}");
    assert!(out.stderr.contains("crashed on request"), "{out:?}");
}

/// Waits until kv has verified its table after the boot, and returns the status.
fn kv_verified(socket: &str) -> Value {
    let deadline = Instant::now() + BOOT_LIMIT;
    loop {
        let status = json(&ctl(socket, &["--json", "status"]));
        if status["workloads"]["kv"]["verified"] != "unknown" && !status["workloads"]["kv"]["verified"].is_null() {
            return status;
        }
        assert!(Instant::now() < deadline, "kv never verified: {status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Under ADR only what the guest wrote back is in the image: a crash (with half the other
/// dirty lines evicted) restores the last commit, and a graceful shutdown, which writes
/// back everything, resumes.
#[test]
fn adr_crash_restores_and_adr_shutdown_resumes() {
    let scratch = Scratch::new();
    let adr = ["--persistence", "adr", "--crash-evict", "0.5", "--seed", "7"];
    let (child, socket) = start_with(&scratch, "apps=kv kv_verify_every=1 checkpoint_ms=100", &adr);
    let committed = json(&ctl(&socket, &["--json", "checkpoint"]))["write_out"]["generation"].as_u64().unwrap();
    let metrics = json(&ctl(&socket, &["--json", "metrics"]));
    assert_eq!(metrics["persistence"]["model"], "adr", "{metrics}");
    assert!(metrics["persistence"]["barriers"].as_u64().unwrap() > 0, "the guest announces barriers: {metrics}");
    assert!(metrics["persistence"]["bytes_made_durable"].as_u64().unwrap() > 0, "{metrics}");
    assert_eq!(metrics["persistence"]["rejected"], 0, "{metrics}");
    assert!(ctl(&socket, &["metrics"]).stdout.contains("persistence: adr"));
    assert_eq!(ctl(&socket, &["crash"]).code(), Some(0));
    let vmm = wait(child, Duration::from_secs(10));
    assert_eq!(vmm.code(), Some(7), "{vmm:?}");
    assert!(vmm.stderr.contains("what the guest wrote back"), "{vmm:?}");

    let (child, socket) = start_with(&scratch, "", &adr);
    let status = kv_verified(&socket);
    assert_eq!(status["boot_kind"], "restored", "{status}");
    assert!(status["committed_generation"].as_u64().unwrap() >= committed, "{status}");
    assert_eq!(status["workloads"]["kv"]["verified"], "passed", "{status}");
    let before = status["workloads"]["kv"]["progress"].as_u64().unwrap();
    assert_eq!(ctl(&socket, &["shutdown"]).code(), Some(0));
    assert_eq!(wait(child, Duration::from_secs(20)).code(), Some(0));

    let (child, socket) = start_with(&scratch, "", &["--persistence", "adr"]);
    let status = kv_verified(&socket);
    assert_eq!(status["boot_kind"], "resumed", "everything was written back at the shutdown: {status}");
    assert_eq!(status["workloads"]["kv"]["verified"], "passed", "{status}");
    assert!(status["workloads"]["kv"]["progress"].as_u64().unwrap() >= before, "{status}");
    ctl(&socket, &["crash"]);
    wait(child, Duration::from_secs(10));
}

/// `--sync`: barriers are announced under eADR too, and each is msync'ed.
#[test]
fn sync_makes_the_guest_announce_barriers_under_eadr() {
    let scratch = Scratch::new();
    let (child, socket) = start_with(&scratch, "apps=counter", &["--sync"]);
    json(&ctl(&socket, &["--json", "checkpoint"]));
    let metrics = json(&ctl(&socket, &["--json", "metrics"]));
    assert_eq!(metrics["persistence"]["model"], "eadr", "{metrics}");
    assert!(metrics["persistence"]["barriers"].as_u64().unwrap() > 0, "{metrics}");
    assert_eq!(ctl(&socket, &["shutdown"]).code(), Some(0));
    assert_eq!(wait(child, Duration::from_secs(20)).code(), Some(0));
    let (child, socket) = start(&scratch, "");
    let metrics = json(&ctl(&socket, &["--json", "metrics"]));
    assert_eq!(metrics["persistence"]["barriers"], 0, "without --sync, eADR needs no barriers: {metrics}");
    ctl(&socket, &["crash"]);
    wait(child, Duration::from_secs(10));
}

/// A shutdown asked for is never lost to a checkpoint asked right after it: the checkpoint
/// is refused (the machine is shutting down) and the VMM exits 0 after the guest's graceful
/// shutdown. Likewise after a SIGTERM.
#[test]
fn a_checkpoint_after_a_shutdown_does_not_cancel_it() {
    let scratch = Scratch::new();
    let (child, socket) = start(&scratch, "apps=counter");
    let mut stream = UnixStream::connect(&socket).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    // Both in one write: the guest cannot take the shutdown before the checkpoint is asked.
    stream.write_all(b"{\"cmd\":\"shutdown\"}\n{\"cmd\":\"checkpoint\"}\n").unwrap();
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["ok"], true, "{first}");
    let mut second = String::new();
    let _ = reader.read_line(&mut second);
    let second: Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second["ok"], false, "{second}");
    assert!(second["error"].as_str().unwrap().contains("shutting down"), "{second}");
    let vmm = wait(child, Duration::from_secs(15));
    assert_eq!(vmm.code(), Some(0), "{vmm:?}");
    assert!(vmm.stderr.contains("the guest powered off"), "{vmm:?}");

    let (child, socket) = start(&scratch, "apps=counter");
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = ctl(&socket, &["--json", "checkpoint"]);
    // Either the checkpoint came first (and was taken) or it is refused; the shutdown stays.
    if out.code() == Some(1) && !out.stdout.is_empty() {
        assert!(json(&out)["error"].as_str().unwrap().contains("shutting down"), "{out:?}");
    }
    let vmm = wait(child, Duration::from_secs(15));
    assert_eq!(vmm.code(), Some(0), "{vmm:?}");
    assert!(vmm.stderr.contains("the guest powered off"), "{vmm:?}");
}

/// The image deleted under the running machine: `status` says so, a checkpoint is refused
/// (it would keep nothing), a shutdown warns, the VMM logs it once and exits 8.
#[test]
fn a_deleted_image_shows_in_status_and_refuses_checkpoints() {
    let scratch = Scratch::new();
    let (child, socket) = start(&scratch, "apps=counter");
    let status = json(&ctl(&socket, &["--json", "status"]));
    assert_eq!(status["image"], "intact", "{status}");
    assert!(status.get("warning").is_none(), "{status}");
    std::fs::remove_file(scratch.image()).unwrap();

    let status = json(&ctl(&socket, &["--json", "status"]));
    assert_eq!(status["image"], "deleted", "{status}");
    assert!(status["warning"].as_str().unwrap().contains("was deleted"), "{status}");
    let out = ctl(&socket, &["checkpoint"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("was deleted"), "{out:?}");
    let refused = json(&ctl(&socket, &["--json", "checkpoint"]));
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("no state is kept"), "{refused}");
    let human = ctl(&socket, &["status"]);
    assert!(human.stderr.contains("was deleted"), "{human:?}");
    let shutdown = json(&ctl(&socket, &["--json", "shutdown"]));
    assert_eq!(shutdown["ok"], true, "{shutdown}");
    assert!(shutdown["warning"].as_str().unwrap().contains("was deleted"), "{shutdown}");
    let vmm = wait(child, Duration::from_secs(15));
    assert_eq!(vmm.code(), Some(8), "{vmm:?}");
    let logged = vmm.stderr.lines().filter(|l| l.contains("ERROR") && l.contains("was deleted")).count();
    assert_eq!(logged, 1, "logged once: {vmm:?}");
}

/// More clients than the VMM has file descriptors: no accept loop spinning (the log stays
/// small), the client over the cap is told so, and once they go a new client is answered.
#[test]
fn many_clients_at_a_low_fd_limit_neither_spin_nor_lock_others_out() {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::sync::{Arc, Mutex};

    let scratch = Scratch::new();
    let socket = scratch.path("vmm.sock").display().to_string();
    let mut cmd = vmm(&[]);
    cmd.args(boot_args(&scratch, "apps=counter")).args(["--control", &socket]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec; it only calls setrlimit, which is
    // async-signal-safe, on a limit on the stack.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit { rlim_cur: 64, rlim_max: 64 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn vmm");
    let mut stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    wait_up(&socket);

    let clients: Vec<UnixStream> = (0..100).filter_map(|_| UnixStream::connect(&socket).ok()).collect();
    let mut last = clients.last().unwrap().try_clone().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut refusal = String::new();
    let _ = BufReader::new(&mut last).read_line(&mut refusal);
    std::thread::sleep(Duration::from_secs(2));
    let logged = log.lock().unwrap().len();
    drop(last);
    drop(clients);
    std::thread::sleep(Duration::from_millis(300));
    let after = request(&socket, r#"{"cmd":"status"}"#);
    let _ = request(&socket, r#"{"cmd":"crash"}"#);
    let _ = child.kill();
    let _ = child.wait();
    let _ = drain.join();

    assert!(logged < 64 << 10, "{logged} bytes of log in 2 s");
    assert!(refusal.contains("too many clients"), "{refusal:?}");
    let refusal: Value = serde_json::from_str(&refusal).unwrap();
    assert_eq!(refusal["ok"], false);
    assert_eq!(after.expect("a client after the crowd is answered")["ok"], true);
}

/// Requests are checked before anything is done: a repeated key is refused (it crashed the
/// machine), a bad `timeout_ms` triggers no write-out; a last request needs no newline.
#[test]
fn tricky_requests_are_refused_before_acting() {
    let scratch = Scratch::new();
    let (mut child, socket) = start(&scratch, "apps=counter");
    let reply = request(&socket, r#"{"cmd":"status","cmd":"crash"}"#).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("duplicate"), "{reply}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "not crashed");

    let generation = request(&socket, r#"{"cmd":"status"}"#).unwrap()["committed_generation"].as_u64().unwrap();
    let reply = request(&socket, r#"{"cmd":"checkpoint","timeout_ms":0}"#).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("timeout_ms"), "{reply}");
    std::thread::sleep(Duration::from_millis(500));
    let now = request(&socket, r#"{"cmd":"status"}"#).unwrap()["committed_generation"].as_u64().unwrap();
    assert_eq!(now, generation, "no write-out for a refused checkpoint");
    let reply = request(&socket, r#"{"cmd":"checkpoint","timeout_ms":86400000}"#).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("timeout_ms"), "{reply}");

    // The last request of a stream without its newline is answered.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.write_all(br#"{"cmd":"status"}"#).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    assert!(reply.contains("\"ok\":true"), "{reply:?}");
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.write_all(br#"{"cmd":"crash"}"#).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let vmm = wait(child, Duration::from_secs(10));
    assert_eq!(vmm.code(), Some(7), "a newline-less crash crashes: {vmm:?}");
}

/// A boot refused because its control socket is in use leaves no new image behind.
#[test]
fn a_boot_refused_for_its_socket_creates_no_image() {
    let scratch = Scratch::new();
    let (child, socket) = start(&scratch, "");
    let new = scratch.path("new.img");
    let out = run(
        &mut vmm(&["boot", "--nvram", &new.display().to_string(), "--control", &socket, "--cmdline", "poweroff"]),
        BOOT_LIMIT,
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("another VMM is listening"), "{out:?}");
    assert!(!new.exists(), "the refused boot left {}", new.display());
    request(&socket, r#"{"cmd":"crash"}"#).unwrap();
    wait(child, Duration::from_secs(10));
}
