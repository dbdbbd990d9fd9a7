//! The bounded run of every target, on stable, in `cargo test`: each checked-in corpus
//! entry (`corpus/TARGET/`, where findings are kept as regressions), then seeded random and
//! mutated inputs. `FUZZ_INPUTS=N` runs N per target instead of the default.

use std::path::Path;

/// Inputs per target by default: enough to cross every decoder's early refusals in CI
/// time; coverage-guided runs go much further (README, "Fuzzing").
const DEFAULT_INPUTS: usize = 3000;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    entries.sort();
    entries.iter().map(|path| std::fs::read(path).expect("read a corpus entry")).collect()
}

fn run<R>(target: &str, f: fn(&[u8]) -> R) {
    let corpus = corpus(target);
    assert!(!corpus.is_empty(), "the corpus of {target} is empty");
    for input in &corpus {
        let _ = f(input);
    }
    let count = std::env::var("FUZZ_INPUTS").ok().and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_INPUTS);
    for input in crate::inputs(&corpus, count, 0x5eed) {
        let _ = f(&input);
    }
}

#[test]
fn control_request() {
    run("control_request", crate::control_request);
}

#[test]
fn cmdline() {
    run("cmdline", crate::cmdline);
}

#[test]
fn image() {
    run("image", crate::image);
}

#[test]
fn disk() {
    run("disk", crate::disk);
}

#[test]
fn machine_control() {
    run("machine_control", crate::machine_control);
}

#[test]
fn copy_engine() {
    run("copy_engine", crate::copy_engine);
}

#[test]
fn persist_barrier() {
    run("persist_barrier", crate::persist_barrier);
}

#[test]
fn program() {
    run("program", crate::program);
}

#[test]
fn virtio_blk() {
    run("virtio_blk", crate::virtio_blk);
}

/// The binary seeds get past the devices' refusals: were the harness to misplace the
/// records, the fuzzing would only ever test the first check.
#[test]
fn the_seeds_reach_the_devices_accepting_paths() {
    for (target, name, bytes) in crate::seeds::seeds() {
        let reached = match target {
            "machine_control" => crate::machine_control(&bytes) == 1,
            "copy_engine" if name == "batch" || name == "sum-only" => crate::copy_engine(&bytes) == (1, 0),
            "copy_engine" => crate::copy_engine(&bytes) == (0, 0),
            "persist_barrier" => crate::persist_barrier(&bytes) == 1,
            "virtio_blk" => crate::virtio_blk(&bytes),
            "image" => crate::image(&bytes),
            "disk" => crate::disk(&bytes),
            "program" => crate::program(&bytes),
            _ => true,
        };
        assert!(reached, "{target}/{name} does not reach the accepting path");
    }
}
