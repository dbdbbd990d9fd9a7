//! What became of the image file while the machine ran on it.
//!
//! Guest RAM is a mapping of the file, so the VMM keeps working when someone deletes,
//! truncates or replaces it, but what the guest stores is then lost at exit, or the next
//! store to a vanished page kills the process with SIGBUS. The VMM asks at every
//! checkpoint, shutdown and status request and at exit, and says so instead of "saved".

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::NvmImage;

/// The image file as the VMM finds it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum ImageFate {
    /// The file is whole and its path still names it.
    Intact,
    /// No name links to the file any more: everything the guest stores is lost at exit.
    Deleted,
    /// The file is shorter than guest RAM: the pages past its end are gone.
    Truncated { size: u64 },
    /// The file is whole, but its path now names another file or nothing (it was moved or
    /// replaced): the guest's memory is kept, in the file under its new name.
    Moved,
}

impl ImageFate {
    /// Whether the guest's memory survives the VMM in a file.
    pub fn is_kept(self) -> bool {
        matches!(self, Self::Intact | Self::Moved)
    }

    /// A sentence for the log and the replies.
    pub fn describe(self, path: &Path, ram: u64) -> String {
        let path = path.display();
        match self {
            Self::Intact => format!("the image {path} is intact"),
            Self::Deleted => {
                format!("the image {path} was deleted while the machine ran: its memory is lost when the VMM exits")
            }
            Self::Truncated { size } => format!(
                "the image {path} was truncated to {size} bytes while the machine ran (guest RAM is {ram} bytes): the guest's memory past that is gone"
            ),
            Self::Moved => {
                format!("the image was moved or replaced: {path} no longer names it; the guest's memory is kept in the moved file")
            }
        }
    }
}

/// Looks at `file`, the image of `size` bytes opened at `path`, without touching either.
fn fate_of(file: &File, path: &Path, size: u64) -> ImageFate {
    let Ok(open) = file.metadata() else { return ImageFate::Intact };
    if open.nlink() == 0 {
        return ImageFate::Deleted;
    }
    if open.len() < size {
        return ImageFate::Truncated { size: open.len() };
    }
    match std::fs::metadata(path) {
        Ok(named) if named.dev() == open.dev() && named.ino() == open.ino() => ImageFate::Intact,
        _ => ImageFate::Moved,
    }
}

impl NvmImage {
    /// What became of the image file since it was opened.
    pub fn fate(&self) -> ImageFate {
        fate_of(self.file(), self.path(), self.size())
    }

    /// A watch on the image for those that outlive the machine's hold on it (the control
    /// interface, the CLI's report at exit). It opens the same file anew through
    /// `/proc/self/fd` (which reaches it even once deleted), read-only: a duplicate of the
    /// descriptor would share its open file description, and with it the image's locks,
    /// which must go when the machine does.
    pub fn watch(&self) -> std::io::Result<ImageWatch> {
        use std::os::fd::AsRawFd;
        let file = File::open(format!("/proc/self/fd/{}", self.file().as_raw_fd()))?;
        Ok(ImageWatch { file, path: self.path().into(), size: self.size() })
    }
}

/// See [`NvmImage::watch`].
#[derive(Debug)]
pub struct ImageWatch {
    file: File,
    path: PathBuf,
    size: u64,
}

impl ImageWatch {
    pub fn fate(&self) -> ImageFate {
        fate_of(&self.file, &self.path, self.size)
    }

    /// The sentence for `fate`, a fate this watch gave.
    pub fn describe(&self, fate: ImageFate) -> String {
        fate.describe(&self.path, self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Allocation, NvmImage};
    use super::ImageFate;

    fn image(name: &str) -> (NvmImage, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("nvm-fate-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        (NvmImage::open(&path, Some(32 << 20), false, Allocation::Sparse).unwrap(), path)
    }

    #[test]
    fn an_untouched_image_is_intact() {
        let (image, path) = image("intact");
        assert_eq!(image.fate(), ImageFate::Intact);
        assert!(image.fate().is_kept());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_deleted_image_is_lost_even_when_a_new_file_takes_its_name() {
        let (image, path) = image("deleted");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(image.fate(), ImageFate::Deleted);
        std::fs::write(&path, b"another file").unwrap();
        assert_eq!(image.fate(), ImageFate::Deleted);
        assert!(!image.fate().is_kept());
        let watch = image.watch().unwrap();
        assert_eq!(watch.fate(), ImageFate::Deleted);
        drop(image);
        assert_eq!(watch.fate(), ImageFate::Deleted, "the watch outlives the image");
        assert!(watch.describe(watch.fate()).contains("was deleted while the machine ran"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_truncated_image_says_how_much_is_left() {
        let (image, path) = image("truncated");
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(1 << 20).unwrap();
        assert_eq!(image.fate(), ImageFate::Truncated { size: 1 << 20 });
        assert!(!image.fate().is_kept());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_watch_does_not_hold_the_image_lock() {
        let (image, path) = image("watch-lock");
        let watch = image.watch().unwrap();
        drop(image);
        let again = NvmImage::open(&path, None, false, Allocation::Sparse).expect("the lock went with the image");
        assert_eq!(watch.fate(), ImageFate::Intact);
        drop(again);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_moved_image_keeps_the_memory() {
        let (image, path) = image("moved");
        let moved = path.with_extension("moved");
        std::fs::rename(&path, &moved).unwrap();
        assert_eq!(image.fate(), ImageFate::Moved);
        assert!(image.fate().is_kept());
        std::fs::remove_file(moved).unwrap();
    }
}
