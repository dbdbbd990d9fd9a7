//! A built machine and its run: the one entry point of the crate.

use std::fs::File;
use std::io::{self, LineWriter, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::dirty::DirtyTracker;
use devices::engine::EngineStats;
use devices::persistence::PowerFailure;
use devices::{
    CopyEngine, ExitDevice, GuestExit, MachineControl, MmioBus, PersistBarrier, PersistenceDomain, PersistenceModel,
    PioBus, SerialConsole, SharedConsole, StatusHandle,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use nvram::ports;
use tracing::info;
use vmm_sys_util::eventfd::EventFd;

use crate::api::Controller;
use crate::config::{ConsoleOutput, DiskConfig, KernelSource, MemoryKind, VmConfig};
use crate::error::Error;
use crate::image::NvmImage;
use crate::loader::{self, LoadError};
use crate::memory::{self, GuestMemory};
use crate::running::RunningMachine;
use crate::vcpu::{self, VcpuStop};
use crate::vcpu_state::{install_kick_handler, VcpuHandle, VcpuShared};
use crate::vm;
use crate::{modules, programs};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest stopped the machine through the exit port.
    Guest(GuestExit),
    /// The VMM was asked to stop ([`VcpuHandle::stop`]).
    Stopped,
}

/// A machine ready to run: image locked, RAM mapped, kernel loaded, vCPU at the entry.
pub struct Machine {
    // Field order is drop order: the vCPU and VM go before the RAM they point into,
    // and the image (and its lock) last.
    vcpu: VcpuFd,
    _vm: Arc<VmFd>,
    _kvm: Kvm,
    pio: PioBus,
    /// The virtio-blk device when there is a disk; an MMIO exit to an address no device
    /// owns reads as ones and is logged by the bus.
    mmio: MmioBus,
    exit: Arc<Mutex<Option<GuestExit>>>,
    status: StatusHandle,
    control: Arc<VcpuShared>,
    domain: Arc<Mutex<PersistenceDomain>>,
    engine_stats: Arc<Mutex<EngineStats>>,
    mem: GuestMemory,
    /// Under ADR, the persistence domain's own mapping of the image.
    image_view: Option<GuestMemory>,
    /// What became of the image file, for every controller (opened once, at build).
    image_watch: Option<Arc<crate::api::WatchedImage>>,
    /// An irqfd of `nvram::control::REQUEST_IRQ`, raised by the controllers.
    request_irq: Arc<EventFd>,
    /// None for volatile RAM.
    image: Option<NvmImage>,
}

impl Machine {
    /// Builds the machine described by `config` (steps 1 to 5 of the crate docs).
    pub fn build(config: &VmConfig) -> Result<Self, Error> {
        config.validate()?;
        let started = Instant::now();
        // KVM first: if it is missing, fail before touching the image.
        let kvm = vm::open_kvm(&config.kvm_device)?;
        // KVM's supported CPUID is asked for meanwhile (see `vcpu::supported_cpuid`).
        let cpuid = vcpu::supported_cpuid(&config.kvm_device);
        let vm_fd = vm::create_vm(&kvm)?;
        let (kernel_bytes, kernel_name): (std::borrow::Cow<'static, [u8]>, String) = match &config.kernel {
            KernelSource::Bundled => (crate::kernel::BUNDLED_KERNEL.into(), "the bundled kernel".to_string()),
            KernelSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.clone(), source })?;
                (bytes.into(), path.display().to_string())
            }
        };
        let console = SharedConsole::new(open_console(&config.console)?);

        let persistence = config.persistence;
        let (image, mem) = match config.memory {
            MemoryKind::Nvm => {
                let image = NvmImage::open(&config.image, config.mem_size, config.reformat, config.allocation)?;
                let mem = memory::map_guest_ram(&image, persistence.model)?;
                (Some(image), mem)
            }
            MemoryKind::Volatile => (None, memory::map_volatile(config.ram_size())?),
        };
        let ram_size = image.as_ref().map_or(config.ram_size(), NvmImage::size);
        // Under ADR the persistence domain writes back into a view of the image of its own
        // (volatile RAM is always eADR: `VmConfig::validate`).
        let image_view = match (persistence.model, &image) {
            (PersistenceModel::Adr, Some(image)) => Some(memory::map_image(image)?),
            _ => None,
        };
        // Guest RAM is a private mapping under ADR (its stores reach the image only when the
        // domain writes them back).
        let mut mappings = vec![memory::Mapping { memory: mem.clone(), private: image_view.is_some() }];
        mappings.extend(image_view.clone().map(|memory| memory::Mapping { memory, private: false }));
        let cmdline = vm::host_cmdline_quirks(&config.cmdline);
        let boot_modules = programs::boot_modules(config, &cmdline, &mem)?;
        let mem = modules::add_window(mem, modules::window_size(&boot_modules)?)?;
        let kernel = loader::load_kernel(&mem, &kernel_bytes, &kernel_name)?;
        let module_list = modules::write(&mem, &boot_modules)?;
        let start_info = loader::write_boot_params(&mem, ram_size, &cmdline, module_list)?;
        // The data worker, if any, runs detached: it holds the mappings it needs. It starts
        // as early as it can, to work while the VM is set up and the kernel boots: mapping
        // the 27 MiB of data of a crashed image of the paper's configuration takes it 2.5 to
        // 3.5 ms (much more on a busy host), the restore begins 6 to 8 ms after the set-up
        // does, and a restore that finds its save areas not mapped yet took 7 ms instead of
        // 3. Not earlier: the VM's creation (`vm::create_vm`) and the kernel's load, which
        // faults in the pages it writes, waited for it (3 to 9 ms) when they came after it.
        if let Some(image) = &image {
            let _ = memory::prefault(image, mappings, config.prefault)?;
        }
        vm::set_up_vm(&vm_fd, &mem)?;
        let vcpu = vcpu::create_vcpu(&vm_fd, cpuid.wait()?, kernel.entry, start_info)?;

        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Setup { what: "serial interrupt", source })?;
        vm_fd.register_irqfd(&serial_irq, ports::COM1_IRQ).map_err(vm::kvm_err("connect the serial interrupt"))?;
        let irq = serial_irq.try_clone().map_err(|source| Error::Setup { what: "serial interrupt", source })?;
        // The request interrupt: a checkpoint asked on the control socket starts at once.
        let request_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Setup { what: "request interrupt", source })?;
        vm_fd
            .register_irqfd(&request_irq, u32::from(nvram::control::REQUEST_IRQ))
            .map_err(vm::kvm_err("connect the request interrupt"))?;
        let exit_device = ExitDevice::new();
        let exit = exit_device.handle();
        let mut pio = PioBus::new();
        let overlap = Error::PortBus;
        pio.register(ports::EXIT, 4, Box::new(exit_device)).map_err(overlap)?;
        // The guest's TSC rate, so that it need not calibrate (an emulated loop under PVM).
        let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
        // The domain's persist barriers, counted where the control device sees them: a crash
        // is placed among the barriers of the write-out under way (torture's coverage).
        let barriers = devices::persistence::BarrierCounter::default();
        let vm_fd = Arc::new(vm_fd);
        let log_vm = vm_fd.clone();
        let ram = ram_size as usize;
        // KVM's log of the pages the guest's CPU writes, read by one tracker for all its users.
        let tracker = Arc::new(Mutex::new(DirtyTracker::new(
            ram_size,
            Some(Box::new(move || log_vm.get_dirty_log(0, ram).ok())),
        )));
        let domain = Arc::new(Mutex::new(
            match image_view.clone() {
                None => PersistenceDomain::eadr(mem.clone(), persistence.sync),
                Some(image_view) => PersistenceDomain::adr(
                    mem.clone(),
                    image_view.clone(),
                    tracker.clone(),
                    persistence.crash_evict,
                    persistence.sync,
                ),
            }
            .with_barrier_counter(barriers.clone()),
        ));
        let mut engine = CopyEngine::new(mem.clone(), domain.clone()).with_dirty_log(tracker.clone());
        let control = MachineControl::new(mem.clone(), tsc_khz)
            .with_batch_ahead(engine.batch_ahead())
            .with_console(console.clone())
            .with_barrier_counter(barriers.clone())
            .with_domain(domain.clone());
        let status = control.status();
        let serial = SerialConsole::new(irq, console.clone()).with_status(status.clone());
        pio.register(ports::COM1, ports::COM1_LEN, Box::new(serial)).map_err(overlap)?;
        pio.register(nvram::control::BASE, nvram::control::LEN, Box::new(control)).map_err(overlap)?;
        let barrier = PersistBarrier::new(mem.clone(), domain.clone());
        pio.register(nvram::persist::BASE, nvram::persist::LEN, Box::new(barrier)).map_err(overlap)?;
        let mut mmio = MmioBus::new();
        match &config.disk {
            Some(disk) => attach_disk(&mut mmio, &vm_fd, &mem, disk, tracker.clone())?,
            None => mmio
                .register(
                    nvram::mmio::VIRTIO_BLK_BASE,
                    nvram::mmio::VIRTIO_BLK_LEN,
                    Box::new(devices::virtio::Placeholder),
                )
                .map_err(Error::MmioBus)?,
        }
        let engine_stats = engine.stats();
        #[cfg(feature = "test-knobs")]
        let engine = match config.engine_pause_ms {
            Some(ms) => engine.with_pause(std::time::Duration::from_millis(ms)),
            None => engine,
        };
        pio.register(nvram::engine::BASE, nvram::engine::LEN, Box::new(engine)).map_err(overlap)?;

        let image_watch = image.as_ref().and_then(|image| match image.watch() {
            Ok(watch) => Some(crate::api::WatchedImage::new(watch)),
            Err(e) => {
                tracing::warn!("cannot watch the image file ({e}): a deletion will not show in the control replies");
                None
            }
        });
        info!(
            image = %image.as_ref().map_or("none (volatile RAM)".into(), |image| image.path().display().to_string()),
            ram_mib = ram_size >> 20,
            created = image.as_ref().is_none_or(NvmImage::created),
            disk = %config.disk.as_ref().map_or("none".into(), |d| d.path.display().to_string()),
            kernel = %kernel_name,
            persistence = ?persistence.model,
            entry = format_args!("{:#x}", kernel.entry),
            setup_ms = started.elapsed().as_secs_f64() * 1e3,
            "machine built"
        );
        Ok(Self {
            vcpu,
            _vm: vm_fd,
            _kvm: kvm,
            pio,
            mmio,
            exit,
            status,
            control: Arc::new(VcpuShared::default()),
            domain,
            engine_stats,
            mem,
            image_view,
            image_watch,
            request_irq: Arc::new(request_irq),
            image,
        })
    }

    /// The one way to watch and drive this machine from other threads: status, checkpoint,
    /// pause, resume, shutdown, crash ([`crate::api`]).
    /// The controller watches the image file, to say so when it is deleted under the machine.
    pub fn controller(&self) -> Controller {
        let controller = Controller::new(self.status.clone(), VcpuHandle(self.control.clone()))
            .with_persistence(self.domain.clone())
            .with_engine(self.engine_stats.clone())
            .with_request_irq(self.request_irq.clone());
        match &self.image_watch {
            Some(watch) => controller.with_image(watch.clone()),
            None => controller,
        }
    }

    /// Records the `nth` write-out to start (from 1) barrier by barrier, and makes nothing
    /// durable after it (`vmm explore`; ADR only, see [`devices::record`]). `plant`, a bug
    /// planted in that write-out, is a test knob: refused by a build without the feature
    /// `test-knobs`, so that no production VMM can be told to lose flushes.
    pub fn record_write_out(&self, nth: u64, plant: Option<devices::record::Plant>) -> Result<(), Error> {
        if plant.is_some() && !cfg!(feature = "test-knobs") {
            return Err(Error::TestKnob("a planted bug"));
        }
        lock_domain(&self.domain).record_write_out(nth, plant);
        Ok(())
    }

    /// Runs the machine on a thread of its own; the handle owns that thread and offers the
    /// [`Controller`].
    pub fn spawn(self) -> Result<RunningMachine, Error> {
        RunningMachine::start(self)
    }

    /// Guest RAM (the mapped image under eADR; a private copy of it under ADR).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The image backing guest RAM; none for volatile RAM.
    pub fn image(&self) -> Option<&NvmImage> {
        self.image.as_ref()
    }

    /// Every mapping of the image in this process: guest RAM, and under ADR the
    /// persistence domain's view (for [`crate::sigbus::report_sigbus_in`]); none for
    /// volatile RAM, which no file backs.
    pub fn image_mappings(&self) -> Vec<&GuestMemory> {
        if self.image.is_none() {
            return Vec::new();
        }
        std::iter::once(&self.mem).chain(self.image_view.as_ref()).collect()
    }

    /// Runs the vCPU on the calling thread until the guest stops the machine, a
    /// [`VcpuHandle`] stops it, or the guest fails.
    pub fn run(&mut self) -> Result<RunOutcome, Error> {
        install_kick_handler().map_err(|source| Error::Setup { what: "vCPU kick signal", source })?;
        self.control.enter();
        let result = vcpu::run(&mut self.vcpu, &mut self.pio, &mut self.mmio, &self.exit, &self.control);
        self.control.leave();
        match result? {
            VcpuStop::Guest(exit) => Ok(RunOutcome::Guest(exit)),
            VcpuStop::Requested => {
                let lost = self.power_fail();
                if lost.dirty_lines > 0 {
                    info!(
                        dirty_lines = lost.dirty_lines,
                        evicted_lines = lost.evicted_lines,
                        "power failure: cache lines the guest had not written back are lost, but the evicted ones"
                    );
                }
                Ok(RunOutcome::Stopped)
            }
        }
    }

    /// A stop is a power failure: under ADR, stores not written back are lost but for the
    /// lines chosen to be evicted (`--crash-evict`); under eADR nothing is lost.
    fn power_fail(&mut self) -> PowerFailure {
        self.domain.lock().unwrap_or_else(|e| e.into_inner()).power_fail()
    }
}

/// Puts the virtio block device on the MMIO bus at [`nvram::mmio::VIRTIO_BLK_BASE`], its
/// interrupt on an irqfd. The device's stores into guest RAM (read data, status bytes) are
/// not in KVM's dirty log, so they are marked in `tracker`, as the copy engine's are: the
/// write-out then finds those pages dirty, and under ADR the persistence domain (which reads
/// the same tracker) treats them as stores not yet written back.
fn attach_disk(
    mmio: &mut MmioBus,
    vm_fd: &VmFd,
    mem: &GuestMemory,
    disk: &DiskConfig,
    tracker: Arc<Mutex<DirtyTracker>>,
) -> Result<(), Error> {
    use devices::virtio::{BlockBackend, Disk, MmioBlock, MmioVersion};
    use nvram::mmio::{VIRTIO_BLK_BASE, VIRTIO_BLK_IRQ, VIRTIO_BLK_LEN};
    let file = Disk::open(&disk.path, disk.size_if_created)?;
    info!(disk = %disk.path.display(), bytes = file.len(), "virtio-blk disk");
    let backend = BlockBackend::new(file, "vmm-disk").with_write_hook(Box::new(move |addr, len| {
        tracker.lock().unwrap_or_else(|e| e.into_inner()).mark(addr, len);
    }));
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Setup { what: "disk interrupt", source })?;
    vm_fd.register_irqfd(&irq, VIRTIO_BLK_IRQ).map_err(vm::kvm_err("connect the disk interrupt"))?;
    let device = MmioBlock::new(MmioVersion::Modern, mem.clone(), backend, Box::new(irq));
    mmio.register(VIRTIO_BLK_BASE, VIRTIO_BLK_LEN, Box::new(device)).map_err(Error::MmioBus)?;
    Ok(())
}

fn open_console(output: &ConsoleOutput) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match output {
        ConsoleOutput::Stdout => Box::new(io::stdout()),
        ConsoleOutput::File(path) => {
            let file = File::create(path).map_err(|source| Error::Console { path: path.clone(), source })?;
            Box::new(LineWriter::new(file))
        }
    })
}

fn lock_domain(d: &Mutex<PersistenceDomain>) -> std::sync::MutexGuard<'_, PersistenceDomain> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}
