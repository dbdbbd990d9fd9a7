//! The KVM virtual machine: in-kernel interrupt controllers and PIT, and guest RAM slots.

use std::io;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// Where KVM puts the three pages of the real-mode TSS it needs on Intel: just below the
/// BIOS area at the top of 4 GiB, outside guest RAM (`nvram::layout::MAX_RAM`).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Why the VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{} does not exist: this host has no KVM; load the kvm module (modprobe kvm_intel or kvm_amd) or enable nested virtualization", path.display())]
    KvmMissing { path: PathBuf },
    #[error("no permission to open {}: add your user to the kvm group (usermod -aG kvm $USER, then log in again) or run as root", path.display())]
    KvmDenied { path: PathBuf },
    #[error("cannot open {}", path.display())]
    KvmOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a usable KVM device (API version {found}, expected 12)", path.display())]
    NotKvm { path: PathBuf, found: i32 },
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Shorthand for mapping a KVM ioctl failure.
pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens the KVM device, with an error that says what to do about it.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::KvmMissing { path: path.into() })?;
    let kvm = Kvm::new_with_path(c_path).map_err(|e| {
        let source = io::Error::from_raw_os_error(e.errno());
        match source.kind() {
            io::ErrorKind::NotFound => VmError::KvmMissing { path: path.into() },
            io::ErrorKind::PermissionDenied => VmError::KvmDenied { path: path.into() },
            _ => VmError::KvmOpen { path: path.into(), source },
        }
    })?;
    match kvm.get_api_version() {
        12 => Ok(kvm),
        found => Err(VmError::NotKvm { path: path.into(), found }),
    }
}

/// Whether this host's KVM is PVM (a page-table-based hypervisor whose instruction emulator,
/// among other things, lacks `clwb`).
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The guest command line with what this host requires added. Under PVM the guest's CPUID
/// is the host's (not intercepted) and offers `clwb`, which PVM cannot emulate: a guest
/// `clwb` stops the VM with an internal error. So the VMM tells the kernel to flush with
/// `clflushopt`, unless the user chose an instruction.
pub fn host_cmdline_quirks(cmdline: &str) -> String {
    let user_chose = cmdline.split_ascii_whitespace().any(|item| item.starts_with("flush="));
    if host_is_pvm() && !user_chose {
        let sep = if cmdline.is_empty() { "" } else { " " };
        format!("{cmdline}{sep}flush=clflushopt")
    } else {
        cmdline.to_string()
    }
}

/// One step of [`set_up_vm`], in the order [`CREATE_STEPS`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CreateStep {
    TssAddress,
    RegisterRam,
    Irqchip,
    Pit,
}

/// The order of the VM's set-up ioctls. Guest RAM is registered first, into a VM that has
/// no device yet: its memory-slot ioctl waits for a grace period of the VM's SRCU
/// (`synchronize_srcu_expedited`), and once the irqchip and the PIT have registered their
/// devices on the VM's buses that wait took 4 to 12 ms here (one to three host timer ticks
/// at 250 Hz), against 0.1 ms before them; the irqchip and the PIT cost the same (about
/// 0.05 ms) either way. Measured with a probe timing each ioctl, 15 runs of each order.
const CREATE_STEPS: [CreateStep; 4] =
    [CreateStep::TssAddress, CreateStep::RegisterRam, CreateStep::Irqchip, CreateStep::Pit];

/// Creates the VM, empty: [`set_up_vm`] gives it its devices and RAM.
///
/// Before guest RAM is mapped ahead (`memory::prefault`): creating a VM registers KVM's MMU
/// notifier, which takes the process's address space for writing and so waited for the
/// mapping ahead, 3 to 4 ms here, when it came second.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    kvm.create_vm().map_err(kvm_err("create a VM"))
}

/// Gives `vm` its in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, and registers guest RAM
/// (in the order of `CREATE_STEPS`).
///
/// The PIT stays: the guest's timer tick is the PIT's channel 0 (through the PIC), and
/// under QEMU the guest calibrates the TSC with its channel 2.
pub fn set_up_vm(vm: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for step in CREATE_STEPS {
        match step {
            CreateStep::TssAddress => vm.set_tss_address(TSS_ADDRESS).map_err(kvm_err("set the TSS address"))?,
            CreateStep::RegisterRam => register_ram(vm, mem)?,
            CreateStep::Irqchip => vm.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?,
            CreateStep::Pit => {
                let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
                vm.create_pit2(pit).map_err(kvm_err("create the in-kernel PIT"))?;
            }
        }
    }
    Ok(())
}

/// Registers each region of guest RAM as a memory slot (one for the image, one for the
/// module window when there are programs), with KVM's dirty log on.
fn register_ram(vm: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.as_ptr() as u64;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host,
            // KVM's log of the pages the guest's CPU writes: the copy engine hands it to the
            // guest kernel, which then need not walk its page tables for dirty bits.
            flags: KVM_MEM_LOG_DIRTY_PAGES,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the machine keeps for
        // as long as the VM exists; KVM accesses it only within `memory_size`.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("register guest RAM"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{CreateStep, CREATE_STEPS};

    fn position(step: CreateStep) -> usize {
        CREATE_STEPS.iter().position(|&s| s == step).expect("every step is taken")
    }

    /// Guest RAM goes in before any in-kernel device: after them, its ioctl waits for the
    /// host (see [`CREATE_STEPS`]).
    #[test]
    fn guest_ram_is_registered_before_the_in_kernel_devices() {
        assert!(position(CreateStep::RegisterRam) < position(CreateStep::Irqchip));
        assert!(position(CreateStep::RegisterRam) < position(CreateStep::Pit));
        assert!(position(CreateStep::Irqchip) < position(CreateStep::Pit), "the PIT needs the irqchip");
        assert_eq!(CREATE_STEPS.len(), 4, "each step once");
    }
}
