//! The paper's evaluation, reproduced: a guest with 456 plates of about 9 MB in all, whose
//! workload dirties 1.4 MB per interval; the latency of a write-out (checkpoint) and of the
//! restore after a crash, as the guest kernel measures them (TSC, converted by the VMM).
//!
//! The paper (Tender on QEMU, 256 MB guest, 456 plates, 8.4 MB plated, 1.4 MB changed)
//! reports a write-out of about 11.5 ms and a restore of about 60.6 ms.
//!
//! `cargo bench --bench plate`; the copier is the copy engine unless `PLATE_COPY=cpu`.

use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use devices::control::{lock, StatusHandle};
use nvram::control::{BootKind, Operation, Request};
use vmm::{ConsoleOutput, Machine, Stopper, VmConfig};

/// The paper's configuration: 450 regions of 18 KiB (plus the stacks, tables and page-table
/// pools: 456 plates, 9.2 MB), 1400 KiB dirtied every 100 ms.
fn paper_cmdline() -> String {
    let copier = std::env::var("PLATE_COPY").unwrap_or_else(|_| "engine".into());
    format!("apps=memtouch memtouch=450,18,1400 memtouch_ms=100 plate_copy={copier}")
}

fn config(image: &std::path::Path, console: &std::path::Path, cmdline: &str) -> VmConfig {
    let mut config = VmConfig::new(image);
    config.mem_size = Some(256 << 20);
    config.cmdline = cmdline.into();
    config.console = ConsoleOutput::File(console.into());
    config
}

struct Running {
    status: StatusHandle,
    stopper: Stopper,
    runner: thread::JoinHandle<()>,
}

fn start(config: VmConfig) -> Running {
    let mut machine = Machine::build(&config).expect("build the machine");
    let status = machine.status();
    let stopper = machine.stopper();
    let runner = thread::spawn(move || {
        machine.run().expect("run the machine");
    });
    Running { status, stopper, runner }
}

impl Running {
    fn wait(&self, what: &str, done: impl Fn(&devices::MachineStatus) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(&lock(&self.status)) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// A power failure: the vCPU stops, the image keeps every store.
    fn crash(self) {
        self.stopper.stop();
        self.runner.join().expect("vCPU thread");
    }
}

fn write_outs(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (image, console) = (dir.path().join("paper.img"), dir.path().join("console.log"));
    let vm = start(config(&image, &console, &paper_cmdline()));
    // Let memtouch map its regions; the first requested write-out plate-ifies them.
    vm.wait("memtouch's regions", |s| s.workloads.get("memtouch").is_some_and(|w| w.progress >= 2));
    let mut group = c.benchmark_group("paper");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("write-out, 456 plates, 1.4 MB dirtied per 100 ms", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let before = lock(&vm.status).of(Operation::WriteOut).count();
                thread::sleep(Duration::from_millis(100));
                lock(&vm.status).pending = Some(Request::Checkpoint);
                vm.wait("a write-out", |s| s.of(Operation::WriteOut).count() > before);
                total += lock(&vm.status).of(Operation::WriteOut).last().unwrap().total;
            }
            total
        })
    });
    group.finish();
    let last = lock(&vm.status).of(Operation::WriteOut).last().cloned().unwrap();
    eprintln!(
        "last write-out: {} plates, {} KiB plated, {} KiB copied by {}, phases {:?}",
        last.report.plates,
        last.report.plated_bytes >> 10,
        last.report.copied_bytes >> 10,
        last.report.copier.name(),
        last.phases
    );
    vm.crash();

    let mut group = c.benchmark_group("paper");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("restore after a crash, 456 plates", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let vm = start(config(&image, &console, "memtouch_ms=100"));
                vm.wait("the restore", |s| s.boot_kind == Some(BootKind::Restored));
                total += lock(&vm.status).of(Operation::Restore).last().unwrap().total;
                vm.crash();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, write_outs);
criterion_main!(benches);
