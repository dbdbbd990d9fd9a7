//! What became of the image file while the machine ran on it.
//!
//! Guest RAM is a mapping of the file, so the VMM keeps working when someone deletes,
//! truncates or replaces it, but what the guest stores is then lost at exit, or the next
//! store to a vanished page kills the process with SIGBUS. The VMM asks at every
//! checkpoint, shutdown and status request and at exit, and says so instead of "saved".

use std::os::unix::fs::MetadataExt;

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
    pub fn describe(self, image: &NvmImage) -> String {
        let path = image.path().display();
        match self {
            Self::Intact => format!("the image {path} is intact"),
            Self::Deleted => {
                format!("the image {path} was deleted while the machine ran: its memory is lost when the VMM exits")
            }
            Self::Truncated { size } => format!(
                "the image {path} was truncated to {size} bytes while the machine ran (guest RAM is {} bytes): the guest's memory past that is gone",
                image.size()
            ),
            Self::Moved => {
                format!("the image was moved or replaced: {path} no longer names it; the guest's memory is kept in the moved file")
            }
        }
    }
}

impl NvmImage {
    /// Looks at the open file and at its path, without touching either.
    pub fn fate(&self) -> ImageFate {
        let Ok(open) = self.file().metadata() else { return ImageFate::Intact };
        if open.nlink() == 0 {
            return ImageFate::Deleted;
        }
        if open.len() < self.size() {
            return ImageFate::Truncated { size: open.len() };
        }
        match std::fs::metadata(self.path()) {
            Ok(named) if named.dev() == open.dev() && named.ino() == open.ino() => ImageFate::Intact,
            _ => ImageFate::Moved,
        }
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
        assert!(image.fate().describe(&image).contains("deleted"));
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
    fn a_moved_image_keeps_the_memory() {
        let (image, path) = image("moved");
        let moved = path.with_extension("moved");
        std::fs::rename(&path, &moved).unwrap();
        assert_eq!(image.fate(), ImageFate::Moved);
        assert!(image.fate().is_kept());
        std::fs::remove_file(moved).unwrap();
    }
}
