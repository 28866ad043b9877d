//! Atomic directory publication: a staging folder becomes the final one by one rename (an exchange
//! where a folder of that name exists), and the directory fsync that makes it durable.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fileio::parent_dir;

/// fsync a directory so that renames inside it are durable.
pub fn fsync_dir(path: &Path) -> Result<()> {
    let dir = File::open(path)
        .map_err(|e| Error::io(path, "cannot open the directory to fsync it", e))?;
    dir.sync_all()
        .map_err(|e| Error::io(path, "cannot fsync the directory", e))
}

fn cstring(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::io(
            path,
            "the path contains a NUL byte",
            io::Error::from_raw_os_error(libc::EINVAL),
        )
    })
}

/// Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let (ca, cb) = match (cstring(a), cstring(b)) {
        (Ok(ca), Ok(cb)) => (ca, cb),
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// Atomically make directory `staging` visible as `final_`. An existing `final_` (a directory) is
/// swapped out in one step with `renameat2(RENAME_EXCHANGE)` and then removed; where the kernel or
/// file system cannot exchange, it is renamed aside to `final_.shardwise-old-<pid>` first. The
/// parent directories are fsynced.
pub fn publish_dir(staging: &Path, final_: &Path) -> Result<()> {
    publish_dir_impl(staging, final_, true)
}

pub(crate) fn publish_dir_impl(staging: &Path, final_: &Path, try_exchange: bool) -> Result<()> {
    let meta = fs::symlink_metadata(staging)
        .map_err(|e| Error::io(staging, "cannot publish the staging directory", e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            staging,
            "the staging path is not a directory",
            io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    let old = match fs::symlink_metadata(final_) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::rename(staging, final_).map_err(|e| {
                Error::io(
                    final_,
                    format!("cannot rename {} into place", staging.display()),
                    e,
                )
            })?;
            None
        }
        Err(e) => return Err(Error::io(final_, "cannot stat the destination", e)),
        Ok(m) if !m.is_dir() => {
            return Err(Error::io(
                final_,
                "refusing to replace something that is not a directory",
                io::Error::from_raw_os_error(libc::ENOTDIR),
            ))
        }
        Ok(_) => {
            let swapped = if try_exchange {
                match exchange(staging, final_) {
                    Ok(()) => true,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                        false
                    }
                    Err(e) => {
                        return Err(Error::io(
                            final_,
                            format!("cannot exchange it with {}", staging.display()),
                            e,
                        ))
                    }
                }
            } else {
                false
            };
            if swapped {
                // The previous contents are now at `staging`.
                Some(staging.to_path_buf())
            } else {
                Some(rename_aside(staging, final_)?)
            }
        }
    };
    fsync_dir(parent_dir(final_))?;
    if parent_dir(staging) != parent_dir(final_) {
        fsync_dir(parent_dir(staging))?;
    }
    if let Some(old) = old {
        // The new contents are live: failing to delete the old tree is not a failed publish. What
        // is left keeps its temporary name (the staging path, or `final.shardwise-old-<pid>`), which
        // resume discovery ignores; the caller removes it (and can warn) once this returns.
        let _ = fs::remove_dir_all(&old);
    }
    Ok(())
}

/// The fallback without RENAME_EXCHANGE: final -> aside, staging -> final. Returns the aside path.
fn rename_aside(staging: &Path, final_: &Path) -> Result<PathBuf> {
    let name = final_.file_name().unwrap_or_default().to_string_lossy();
    let pid = std::process::id();
    let mut aside = parent_dir(final_).join(format!("{name}.shardwise-old-{pid}"));
    let mut n = 0u32;
    while fs::symlink_metadata(&aside).is_ok() {
        n += 1;
        aside = parent_dir(final_).join(format!("{name}.shardwise-old-{pid}-{n}"));
    }
    fs::rename(final_, &aside).map_err(|e| {
        Error::io(
            final_,
            format!(
                "cannot move the previous directory aside to {}",
                aside.display()
            ),
            e,
        )
    })?;
    if let Err(e) = fs::rename(staging, final_) {
        // Put the previous directory back.
        let _ = fs::rename(&aside, final_);
        return Err(Error::io(
            final_,
            format!("cannot rename {} into place", staging.display()),
            e,
        ));
    }
    Ok(aside)
}
