//! The one error type of the core: malformed input (a header, an argument) or a failed I/O call.
//!
//! The pyo3 layer maps [`Error::Format`] to `shardwise.errors.HeaderError` and [`Error::Io`] to
//! `shardwise.errors.CheckpointIOError(errno, strerror, filename)`.

use std::fmt;
use std::io;
use std::path::Path;

/// Every failure of the core.
#[derive(Debug)]
pub enum Error {
    /// Malformed or inconsistent input: a bad safetensors header, pieces that do not tile a file,
    /// an unknown dtype. `path` names the file concerned, when there is one.
    Format { path: Option<String>, msg: String },
    /// An I/O call failed. `path` is the file the caller asked about; `context` says what was
    /// being done (it may name a temporary file).
    Io {
        path: String,
        context: String,
        source: io::Error,
    },
}

/// Shorthand for results of the core.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A malformed-input error about the file at `path`.
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: Some(path.as_ref().display().to_string()),
            msg: msg.into(),
        }
    }

    /// A malformed-argument error that concerns no particular file.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Format {
            path: None,
            msg: msg.into(),
        }
    }

    /// An I/O error about `path` while doing `context`.
    pub fn io(path: impl AsRef<Path>, context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            context: context.into(),
            source,
        }
    }

    /// The OS error number of an I/O error (`EINVAL` for an invalid argument such as a path with a
    /// NUL byte, `EIO` for other errors that did not come from the OS).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => {
                Some(source.raw_os_error().unwrap_or(match source.kind() {
                    io::ErrorKind::InvalidInput => libc::EINVAL,
                    _ => libc::EIO,
                }))
            }
            Error::Format { .. } => None,
        }
    }

    /// For an I/O error, the `strerror` part: what was being done and the OS's description,
    /// without Rust's " (os error N)" suffix.
    pub fn strerror(&self) -> String {
        match self {
            Error::Io {
                context, source, ..
            } => format!("{context}: {}", describe_io(source)),
            Error::Format { msg, .. } => msg.clone(),
        }
    }

    /// The file this error is about, if any.
    pub fn path(&self) -> Option<&str> {
        match self {
            Error::Io { path, .. } => Some(path),
            Error::Format { path, .. } => path.as_deref(),
        }
    }
}

/// The OS's description of an I/O error without the " (os error N)" suffix std adds.
fn describe_io(err: &io::Error) -> String {
    let text = err.to_string();
    match err.raw_os_error() {
        Some(code) => {
            let suffix = format!(" (os error {code})");
            text.strip_suffix(&suffix).unwrap_or(&text).to_string()
        }
        None => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Format {
                path: Some(path),
                msg,
            } => write!(f, "{path}: {msg}"),
            Error::Format { path: None, msg } => f.write_str(msg),
            Error::Io { path, .. } => write!(
                f,
                "{path}: {} (errno {})",
                self.strerror(),
                self.errno().unwrap_or(libc::EIO)
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Format { .. } => None,
        }
    }
}

/// A string shown in an error message: JSON-quoted, so that odd characters are visible.
pub(crate) fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_error_has_errno_and_clean_strerror() {
        let err = Error::io(
            "/x/y",
            "opening",
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(err.errno(), Some(libc::ENOENT));
        assert_eq!(err.strerror(), "opening: No such file or directory");
        assert_eq!(err.path(), Some("/x/y"));
        assert!(err.to_string().starts_with("/x/y: opening: "));
    }

    #[test]
    fn non_os_io_error_maps_to_eio() {
        let err = Error::io("/x", "reading", io::Error::other("boom"));
        assert_eq!(err.errno(), Some(libc::EIO));
        assert_eq!(err.strerror(), "reading: boom");
        let err = Error::io(
            "/x",
            "opening",
            io::Error::from(io::ErrorKind::InvalidInput),
        );
        assert_eq!(err.errno(), Some(libc::EINVAL));
    }

    #[test]
    fn format_error_names_the_file() {
        let err = Error::format("/a/b.safetensors", "bad");
        assert_eq!(err.to_string(), "/a/b.safetensors: bad");
        assert_eq!(Error::invalid("oops").to_string(), "oops");
    }
}
