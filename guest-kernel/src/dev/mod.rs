//! The guest's drivers of the machine's devices: the serial console (and the `print!`/
//! `println!` macros), machine control, the copy engine, the persist barrier, the exit
//! device and the virtio block device. They use only `arch` (ports are reached from ring-3 work through
//! `arch::ring3::privileged`); everything above prints through them.

pub mod console;
pub mod control;
pub mod engine;
pub mod machine;
pub mod persist;
pub mod virtio;
