//! An I/O error together with the operation and the path it concerned:
//! how every file vfiod touches (sysfs, the state file, the socket)
//! reports failures, so a message always says what failed and where.

use std::io;
use std::path::{Path, PathBuf};

/// An I/O error with what was being done and to which file.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct PathError {
    /// The operation, as a verb: `read`, `write`, `rename`, `fsync`.
    pub op: &'static str,
    /// The file it was done to.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl PathError {
    /// For `map_err`: `.map_err(PathError::at("write", &path))`.
    pub fn at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PathError + 'a {
        move |source| PathError {
            op,
            path: path.to_owned(),
            source,
        }
    }

    /// The raw OS errno (`ENOSPC`, `EBUSY`, ...), for the wire and for telling
    /// a full disk from a broken one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}
