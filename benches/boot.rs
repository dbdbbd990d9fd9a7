//! Boot latency: from building the machine (KVM VM, file-backed RAM, kernel load) to the
//! guest's power-off, with the `poweroff` command line, on a fresh and on a formatted image.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use vmm::{ConsoleOutput, Machine, RunOutcome, VmConfig};

fn boot_once(image: &std::path::Path, console: &std::path::Path) {
    let mut config = VmConfig::new(image);
    config.mem_size = Some(256 << 20);
    config.cmdline = "poweroff".into();
    config.console = ConsoleOutput::File(console.into());
    let mut machine = Machine::build(&config).expect("build the machine");
    let outcome = machine.run().expect("run the machine");
    assert!(matches!(outcome, RunOutcome::Guest(_)), "{outcome:?}");
}

fn boot(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("scratch dir");
    let image = dir.path().join("bench.img");
    let console = dir.path().join("console.log");
    let mut group = c.benchmark_group("boot");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    group.bench_function("poweroff, 256 MiB image", |b| b.iter(|| boot_once(&image, &console)));
    group.finish();
}

criterion_group!(benches, boot);
criterion_main!(benches);
