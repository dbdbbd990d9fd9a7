//! The programs a boot hands the guest: the bundled ones the command line's `apps=` names,
//! then the user's own files (`VmConfig::programs`), in that order.
//!
//! A program is started by the boot that formats the image, and from then on lives in it
//! (its code and data are plated with its space), so a boot that will resume or restore
//! an image takes no program files: that is refused here, before the guest runs, rather
//! than having the guest ignore them. The bundled ones named by `apps=` are handed over at
//! every boot, and the kernel starts them only when it formats, as it always did.

use std::borrow::Cow;

use nvram::cmdline::Cmdline;
use nvram::header::{self, HeaderError, RootHeader, ShutdownFlag, HEADER_SIZE};
use nvram::layout::{ROOT_HEADER, ROOT_HEADER_COPY};
use vm_memory::{Bytes, GuestAddress};

use crate::config::VmConfig;
use crate::error::Error;
use crate::memory::GuestMemory;
use crate::modules::BootModule;

/// The modules for this boot. `cmdline` is the kernel command line as the guest gets it:
/// the bundled programs take it as their argument string and read their keys from it.
pub fn boot_modules(config: &VmConfig, cmdline: &str, ram: &GuestMemory) -> Result<Vec<BootModule>, Error> {
    let parsed = Cmdline::parse(cmdline, |_| {});
    let mut modules = Vec::new();
    for app in parsed.apps() {
        let bundled = crate::apps::embedded(app.name()).ok_or(Error::NoSuchApp { name: app.name() })?;
        modules.push(BootModule { name: app.name().into(), args: cmdline.into(), elf: Cow::Borrowed(bundled.elf) });
    }
    if config.programs.is_empty() {
        return Ok(modules);
    }
    if let Some(how) = warm_boot(ram, parsed.plate) {
        return Err(Error::ProgramsForWarmImage { path: config.image.clone(), how });
    }
    for program in &config.programs {
        let elf =
            std::fs::read(&program.path).map_err(|source| Error::ReadProgram { path: program.path.clone(), source })?;
        modules.push(BootModule { name: program.name(), args: program.args.clone(), elf: Cow::Owned(elf) });
    }
    Ok(modules)
}

/// How the guest will take this image when it will not format it: the kernel's own
/// decision (`guest-kernel/src/main.rs`, `decide`) read from the root header's two copies.
/// `None`: it formats (a blank image, or a crash before anything was committed). An
/// image the kernel will refuse is left to the kernel, which says why.
fn warm_boot(ram: &GuestMemory, plate: bool) -> Option<&'static str> {
    let read = |at: u64| {
        let mut bytes = [0u8; HEADER_SIZE];
        ram.read_slice(&mut bytes, GuestAddress(at)).ok().map(|()| RootHeader::from_bytes(&bytes))
    };
    let (first, second) = (read(ROOT_HEADER)?, read(ROOT_HEADER_COPY)?);
    match header::choose(&first, &second) {
        Ok((_, ShutdownFlag::Normal, _)) => Some("will resume where it shut down"),
        Ok((h, ShutdownFlag::Abnormal, _)) if plate && h.generation > 0 => Some("will restore its last checkpoint"),
        Ok(_) | Err(HeaderError::Blank) => None,
        Err(_) => None,
    }
}
