//! The vCPU: its state at the PVH entry, and the run loop that serves its exits.
//!
//! How the loop ends (the states the VMM drives, running, paused, stopping, are those of
//! [`crate::vcpu_state::VcpuState`]):
//!
//! ```text
//!   port I/O                                    served by the devices on the port bus; go on
//!   MMIO outside guest RAM                      served by the devices on the MMIO bus; go on
//!   a stop asked for (and kicked)               VcpuStop::Requested
//!   the exit port                               VcpuStop::Guest
//!   triple fault, internal error, odd exit      GuestError
//! ```
//!
//! A kick is a signal to the vCPU thread that sets `immediate_exit`: a running `KVM_RUN`
//! returns `EINTR`, and so does one about to start ([`crate::vcpu_state`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::{GuestExit, MmioBus, PioBus};
use kvm_bindings::{kvm_segment, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use tracing::warn;

use crate::vcpu_state::{KickTarget, Step, VcpuShared};
use crate::vm::{kvm_err, VmError};

/// A stop of the guest the VMM cannot continue from.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("the guest triple-faulted (the CPU shut down); registers at the fault:\n{regs}")]
    TripleFault { regs: RegisterDump },
    #[error("KVM could not run the guest (internal error, suberror {suberror}); registers:\n{regs}")]
    Internal { suberror: u32, regs: RegisterDump },
    #[error("KVM failed to enter the guest (hardware reason {reason:#x}); registers:\n{regs}")]
    FailEntry { reason: u64, regs: RegisterDump },
    #[error("unexpected vCPU exit: {exit}; registers:\n{regs}")]
    Unexpected { exit: String, regs: RegisterDump },
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}

/// Why the vCPU loop ended without a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest wrote to the exit port.
    Guest(GuestExit),
    /// The VMM asked the vCPU to stop.
    Requested,
}

/// The registers worth showing when a guest dies.
#[derive(Debug, Default)]
pub struct RegisterDump {
    text: String,
}

impl RegisterDump {
    fn capture(vcpu: &VcpuFd) -> Self {
        let mut text = String::new();
        use fmt::Write;
        match vcpu.get_regs() {
            Ok(r) => {
                let _ = writeln!(text, "  rip {:#018x} rsp {:#018x} rflags {:#010x}", r.rip, r.rsp, r.rflags);
                let _ =
                    writeln!(text, "  rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}", r.rax, r.rbx, r.rcx, r.rdx);
                let _ = writeln!(text, "  rsi {:#018x} rdi {:#018x} rbp {:#018x}", r.rsi, r.rdi, r.rbp);
                let _ =
                    writeln!(text, "  r8  {:#018x} r9  {:#018x} r10 {:#018x} r11 {:#018x}", r.r8, r.r9, r.r10, r.r11);
                let _ =
                    writeln!(text, "  r12 {:#018x} r13 {:#018x} r14 {:#018x} r15 {:#018x}", r.r12, r.r13, r.r14, r.r15);
            }
            Err(e) => {
                let _ = writeln!(text, "  (general registers unavailable: {e})");
            }
        }
        match vcpu.get_sregs() {
            Ok(s) => {
                let _ = writeln!(
                    text,
                    "  cr0 {:#010x} cr2 {:#018x} cr3 {:#018x} cr4 {:#010x} efer {:#x}",
                    s.cr0, s.cr2, s.cr3, s.cr4, s.efer
                );
                let _ = write!(
                    text,
                    "  cs {:#06x} (l={} db={} dpl={}) ss {:#06x} idt {:#x}/{:#x} gdt {:#x}/{:#x}",
                    s.cs.selector,
                    s.cs.l,
                    s.cs.db,
                    s.cs.dpl,
                    s.ss.selector,
                    s.idt.base,
                    s.idt.limit,
                    s.gdt.base,
                    s.gdt.limit
                );
            }
            Err(e) => {
                let _ = write!(text, "  (system registers unavailable: {e})");
            }
        }
        Self { text }
    }
}

impl fmt::Display for RegisterDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;

/// KVM's supported CPUID, asked for on a thread of its own ([`supported_cpuid`]).
pub struct PendingCpuid {
    thread: Option<std::thread::JoinHandle<Result<CpuId, VmError>>>,
    kvm_device: PathBuf,
}

/// Starts asking KVM (the device at `kvm_device`, opened anew by the thread) for the CPUID
/// it supports. The ioctl takes about 0.65 ms here and needs nothing else of the machine,
/// so it runs while the image is opened and mapped, the VM created and the kernel loaded,
/// instead of after them.
pub fn supported_cpuid(kvm_device: &Path) -> PendingCpuid {
    let path = kvm_device.to_path_buf();
    let thread = std::thread::Builder::new().name("cpuid".into()).spawn(move || ask_cpuid(&path)).ok();
    PendingCpuid { thread, kvm_device: kvm_device.to_path_buf() }
}

impl PendingCpuid {
    /// The supported CPUID; asked for here if the thread could not start or did not answer.
    pub fn wait(self) -> Result<CpuId, VmError> {
        match self.thread.map(std::thread::JoinHandle::join) {
            Some(Ok(answer)) => answer,
            Some(Err(_)) | None => ask_cpuid(&self.kvm_device),
        }
    }
}

fn ask_cpuid(kvm_device: &Path) -> Result<CpuId, VmError> {
    let kvm = crate::vm::open_kvm(kvm_device)?;
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("report the supported CPUID"))
}

/// Creates vCPU 0 with `cpuid` (KVM's supported CPUID, [`supported_cpuid`]) and puts it in
/// the state the PVH protocol promises: 32-bit protected mode, paging off, flat segments,
/// `ebx` = `start_info`.
pub fn create_vcpu(vm: &VmFd, mut cpuid: CpuId, entry: u64, start_info: u64) -> Result<VcpuFd, VmError> {
    let vcpu = vm.create_vcpu(0).map_err(kvm_err("create a vCPU"))?;
    adjust_cpuid(&mut cpuid);
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set the vCPU's CPUID"))?;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err("read the vCPU's system registers"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment { selector: 0x10, type_: 0x3, ..code }; // read/write, accessed
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment { selector: 0x18, limit: 0x67, type_: 0xb, s: 0, db: 0, g: 0, ..code }; // 32-bit busy TSS
    sregs.cr0 = 0x1; // PE
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("set the vCPU's system registers"))?;

    let regs = kvm_bindings::kvm_regs { rip: entry, rbx: start_info, rflags: 0x2, ..Default::default() };
    vcpu.set_regs(&regs).map_err(kvm_err("set the vCPU's registers"))?;

    // LINT0 delivers the PIC's interrupts (ExtINT) and LINT1 NMIs, as a PC's firmware sets.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("read the local APIC"))?;
    set_lvt(&mut lapic, 0x350, 0x700);
    set_lvt(&mut lapic, 0x360, 0x400);
    vcpu.set_lapic(&lapic).map_err(kvm_err("set the local APIC"))?;
    Ok(vcpu)
}

/// Sets the delivery mode of the LAPIC LVT register at `offset`, unmasked.
fn set_lvt(lapic: &mut kvm_bindings::kvm_lapic_state, offset: usize, mode: u32) {
    let bytes: Vec<u8> = lapic.regs[offset..offset + 4].iter().map(|&b| b as u8).collect();
    let mut value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    value = (value & !0x1_0700) | mode;
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = b as _;
    }
}

/// Tells the guest it runs on a hypervisor. (Under PVM the guest's CPUID instruction is
/// not intercepted and it sees the host's; see [`crate::vm::host_cmdline_quirks`].)
fn adjust_cpuid(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == 1 {
            entry.ecx |= CPUID_HYPERVISOR_BIT;
        }
    }
}

/// Runs the vCPU until the guest stops the machine, a stop is asked for, or the guest
/// fails; parks while a pause is asked for.
///
/// The state is looked at before each entry; a request kicks a running `KVM_RUN` out
/// ([`crate::vcpu_state`]). The caller has entered `shared` on this thread.
pub(crate) fn run(
    vcpu: &mut VcpuFd,
    pio: &mut PioBus,
    mmio: &mut MmioBus,
    exit: &Arc<Mutex<Option<GuestExit>>>,
    shared: &VcpuShared,
) -> Result<VcpuStop, GuestError> {
    let _target = KickTarget::register(vcpu);
    loop {
        // Cleared before the look at the state: a kick after this either is seen by the
        // look or makes the next KVM_RUN return at once.
        vcpu.set_kvm_immediate_exit(0);
        if shared.next_step() == Step::Stop {
            return Ok(VcpuStop::Requested);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(port, data);
                // Only a write to the exit port can ask for a stop.
                if port == nvram::ports::EXIT {
                    if let Some(request) = *exit.lock().unwrap_or_else(|e| e.into_inner()) {
                        return Ok(VcpuStop::Guest(request));
                    }
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(port, data);
            }
            // An address no device owns reads as ones and is logged by the bus.
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                // Only seen without an in-kernel LAPIC; nothing will wake the CPU.
                warn!("the guest halted with no way to wake up");
                return Ok(VcpuStop::Requested);
            }
            Ok(VcpuExit::Shutdown) => return Err(GuestError::TripleFault { regs: RegisterDump::capture(vcpu) }),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: reading the internal-error member of the kvm_run union is valid
                // right after an exit whose reason is KVM_EXIT_INTERNAL_ERROR.
                let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                return Err(GuestError::Internal { suberror, regs: RegisterDump::capture(vcpu) });
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                return Err(GuestError::FailEntry { reason, regs: RegisterDump::capture(vcpu) })
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                let exit = format!("{other:?}");
                return Err(GuestError::Unexpected { exit, regs: RegisterDump::capture(vcpu) });
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(GuestError::Run(e)),
        }
    }
}
