//! Helpers shared by the integration tests: run the real `vmm` binary on a scratch image,
//! with a deadline, and read what it left behind.
#![allow(dead_code)] // Each test file uses its own subset.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `vmm` binary under test.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

/// A scratch directory, removed when dropped.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self { dir: tempfile::Builder::new().prefix("nvm-test-").tempdir().expect("create a scratch dir") }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn image(&self) -> PathBuf {
        self.path("nvm.img")
    }

    pub fn console(&self) -> PathBuf {
        self.path("console.log")
    }

    pub fn read_console(&self) -> String {
        std::fs::read_to_string(self.console()).unwrap_or_default()
    }
}

/// An in-process machine on the scratch image (`vmm::harness`): `mem` bytes of RAM, the
/// console in the scratch file.
pub fn machine_config(scratch: &Scratch, cmdline: &str, mem: u64) -> vmm::VmConfig {
    let mut config = vmm::VmConfig::new(scratch.image());
    config.mem_size = Some(mem);
    config.cmdline = cmdline.into();
    config.console = vmm::ConsoleOutput::File(scratch.console());
    config
}

/// A `vmm` command with quiet logs.
pub fn vmm(args: &[&str]) -> Command {
    let mut cmd = Command::new(vmm_bin());
    cmd.args(args).env("RUST_LOG", "warn").stdin(Stdio::null());
    cmd
}

/// Arguments of `vmm boot` on the scratch image with its console in a file.
pub fn boot_args(scratch: &Scratch, cmdline: &str) -> Vec<String> {
    vec![
        "boot".into(),
        "--nvram".into(),
        scratch.image().display().to_string(),
        "--mem".into(),
        "32M".into(),
        "--console".into(),
        scratch.console().display().to_string(),
        "--cmdline".into(),
        cmdline.into(),
    ]
}

/// The result of a finished command.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "status {:?}\n--- stdout\n{}\n--- stderr\n{}", self.status, self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion, killing it (and failing the test) after `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Finished {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn vmm");
    wait(child, limit)
}

/// Waits for `child`, killing it (and failing the test) after `limit`.
pub fn wait(mut child: Child, limit: Duration) -> Finished {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait for vmm").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!("vmm did not finish within {limit:?}:\n{:?}", finished(out));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    finished(child.wait_with_output().expect("collect output"))
}

fn finished(out: Output) -> Finished {
    Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Polls `file` until it contains `needle`, or fails after `limit`.
pub fn wait_for_text(file: &Path, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(file) {
            let _ = f.read_to_string(&mut text);
        }
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "\"{needle}\" did not appear in {} within {limit:?}; it holds:\n{text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How long a boot that powers off may take, generously (a boot takes ~0.1 s).
pub const BOOT_LIMIT: Duration = Duration::from_secs(20);

/// The first root header copy of the scratch image, as the guest left it.
pub fn read_header(scratch: &Scratch) -> nvram::header::RootHeader {
    use nvram::header::{RootHeader, HEADER_SIZE};
    let image = std::fs::read(scratch.image()).expect("read the image");
    let at = nvram::layout::ROOT_HEADER as usize;
    let bytes: [u8; HEADER_SIZE] = image[at..at + HEADER_SIZE].try_into().unwrap();
    RootHeader::from_bytes(&bytes)
}
