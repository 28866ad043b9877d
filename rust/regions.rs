//! Writes into files that already exist at their final size: the distributed save.
//!
//! The coordinator of a `torch.distributed.checkpoint` save knows every file's final layout before a
//! byte is written, so it creates each file at full size with its header ([`create_files`]); then
//! every rank writes the byte ranges it owns straight from its tensor memory ([`write_regions`]):
//! a list of segments `(src offset in a buffer, dst offset in the file, length)` per buffer.
//! Segments that are contiguous in the file are written with one `pwritev` (one iovec per segment,
//! at most `IOV_MAX` per call), so a block of rows scattered by a row permutation costs a few system
//! calls, not one per row. Nothing is created, truncated or renamed here: publishing the folder is
//! the coordinator's job once every rank has written and fsynced.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::fileio::{prefault, reserve, CHUNK_SIZE};
use crate::header::validate_raw;
use crate::pool::{build_pool, effective_threads};

/// Most iovecs one `pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// `len` bytes from `src` of a buffer go to `dst` of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// One buffer and where its bytes go.
#[derive(Debug, Clone)]
pub struct Region<'a> {
    pub data: &'a [u8],
    pub segments: Vec<Segment>,
}

/// One existing file and the regions to write into it.
#[derive(Debug, Clone)]
pub struct RegionFile<'a> {
    pub path: PathBuf,
    pub regions: Vec<Region<'a>>,
}

/// A file to create: its path, its header (8-byte prefix included) and its final size.
#[derive(Debug, Clone)]
pub struct NewFile<'a> {
    pub path: PathBuf,
    pub header: &'a [u8],
    pub size: u64,
}

/// Created files of one call; removed on drop unless the call succeeded.
struct Created(Vec<PathBuf>);

impl Drop for Created {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// Create every file (it must not exist), sized to its final size (blocks reserved off tmpfs), with
/// its header written at offset 0. The header must be a valid safetensors header whose data area
/// ends exactly at `size`. All-or-nothing: on failure the files created so far are removed.
pub fn create_files(files: &[NewFile<'_>], fsync: bool) -> Result<()> {
    for f in files {
        let declared = validate_raw(&f.path, f.header)?.data_len;
        let expected = (f.header.len() as u64).checked_add(declared);
        if expected != Some(f.size) {
            return Err(Error::format(
                &f.path,
                format!(
                    "the header declares {} bytes of data after {} header bytes, but the file is to be {} bytes",
                    declared,
                    f.header.len(),
                    f.size
                ),
            ));
        }
    }
    let mut created = Created(Vec::with_capacity(files.len()));
    for f in files {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&f.path)
            .map_err(|e| Error::io(&f.path, "cannot create the file", e))?;
        created.0.push(f.path.clone());
        reserve(&file, f.size).map_err(|e| {
            Error::io(
                &f.path,
                format!("cannot size the file to {} bytes", f.size),
                e,
            )
        })?;
        file.write_all_at(f.header, 0)
            .map_err(|e| Error::io(&f.path, "cannot write the header", e))?;
        if fsync {
            file.sync_all()
                .map_err(|e| Error::io(&f.path, "cannot fsync the file", e))?;
        }
    }
    created.0.clear();
    Ok(())
}

/// One `pwritev`-able run: contiguous in the file, from any number of (pieces of) buffers.
struct Job<'a> {
    file: usize,
    offset: u64,
    slices: Vec<&'a [u8]>,
    /// the region (buffer) the last slice came from: only slices of one buffer are merged
    last_region: usize,
}

/// Check every segment against its buffer and the file size, and that no two overlap in the file.
fn validate(
    path: &Path,
    regions: &[Region<'_>],
    size: u64,
) -> Result<Vec<(u64, u64, usize, usize)>> {
    // (dst, len, region, segment)
    let mut all = Vec::new();
    for (r, region) in regions.iter().enumerate() {
        let buf_len = region.data.len() as u64;
        for (s, seg) in region.segments.iter().enumerate() {
            let src_end = seg.src.checked_add(seg.len);
            let dst_end = seg.dst.checked_add(seg.len);
            if src_end.is_none_or(|e| e > buf_len) {
                return Err(Error::format(
                    path,
                    format!(
                        "region {r} segment {s}: bytes {}..+{} are outside its buffer of {buf_len} bytes",
                        seg.src, seg.len
                    ),
                ));
            }
            if dst_end.is_none_or(|e| e > size) {
                return Err(Error::format(
                    path,
                    format!(
                        "region {r} segment {s}: file bytes {}..+{} are outside the file of {size} bytes",
                        seg.dst, seg.len
                    ),
                ));
            }
            if seg.len > 0 {
                all.push((seg.dst, seg.len, r, s));
            }
        }
    }
    all.sort_unstable();
    for w in all.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a.0 + a.1 > b.0 {
            return Err(Error::format(
                path,
                format!(
                    "file bytes {}..{} are written twice (region {} segment {} and region {} segment {})",
                    b.0,
                    (a.0 + a.1).min(b.0 + b.1),
                    a.2,
                    a.3,
                    b.2,
                    b.3
                ),
            ));
        }
    }
    Ok(all)
}

/// Group sorted segments into jobs: runs contiguous in the file, at most [`IOV_MAX`] slices and
/// about [`CHUNK_SIZE`] bytes each (the unit of parallelism); a slice adjacent to the previous one in
/// its buffer too is merged into it.
fn plan_jobs<'a>(
    file: usize,
    regions: &[Region<'a>],
    sorted: &[(u64, u64, usize, usize)],
    jobs: &mut Vec<Job<'a>>,
) {
    let mut current: Option<(Job<'a>, u64, u64)> = None; // job, next dst, job bytes
    for &(dst, len, r, s) in sorted {
        let seg = regions[r].segments[s];
        let data = regions[r].data;
        let mut src = seg.src as usize;
        let mut at = dst;
        let mut left = len as usize;
        while left > 0 {
            let take = left.min(CHUNK_SIZE);
            let piece = &data[src..src + take];
            let continues = matches!(&current, Some((_, next, bytes)) if *next == at && *bytes + take as u64 <= CHUNK_SIZE as u64);
            if !continues {
                if let Some((job, _, _)) = current.take() {
                    jobs.push(job);
                }
                current = Some((
                    Job {
                        file,
                        offset: at,
                        slices: Vec::new(),
                        last_region: r,
                    },
                    at,
                    0,
                ));
            }
            if let Some((job, next, bytes)) = current.as_mut() {
                let same_buffer = job.last_region == r;
                let merged = same_buffer
                    && job.slices.last_mut().is_some_and(|last| {
                        let end = last.as_ptr() as usize + last.len();
                        if end == piece.as_ptr() as usize {
                            // SAFETY: `last` and `piece` are adjacent ranges of the same buffer `data`
                            // (the last slice came from region `r` too), so the union is one valid slice of it.
                            *last = unsafe {
                                std::slice::from_raw_parts(last.as_ptr(), last.len() + take)
                            };
                            true
                        } else {
                            false
                        }
                    });
                if !merged {
                    if job.slices.len() == IOV_MAX {
                        let full = std::mem::replace(
                            job,
                            Job {
                                file,
                                offset: at,
                                slices: Vec::new(),
                                last_region: r,
                            },
                        );
                        jobs.push(full);
                        *bytes = 0;
                    }
                    job.slices.push(piece);
                    job.last_region = r;
                }
                *next = at + take as u64;
                *bytes += take as u64;
            }
            src += take;
            at += take as u64;
            left -= take;
        }
    }
    if let Some((job, _, _)) = current {
        jobs.push(job);
    }
}

/// `pwritev` all of `slices` at `offset`, retrying after short writes and EINTR.
fn pwritev_all(file: &File, slices: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = slices
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| libc::iovec {
            iov_base: s.as_ptr() as *mut libc::c_void,
            iov_len: s.len(),
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let off =
            libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let cnt = (iov.len() - first) as libc::c_int;
        // SAFETY: every iovec points into a live buffer of at least iov_len bytes (borrowed slices).
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov[first..].as_ptr(), cnt, off) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        let mut n = n as usize;
        offset += n as u64;
        while first < iov.len() && n >= iov[first].iov_len {
            n -= iov[first].iov_len;
            first += 1;
        }
        if n > 0 {
            // SAFETY: advancing within the same buffer by fewer than iov_len bytes.
            iov[first].iov_base =
                unsafe { (iov[first].iov_base as *mut u8).add(n) } as *mut libc::c_void;
            iov[first].iov_len -= n;
        }
    }
    Ok(())
}

/// Write every region into its existing file (opened for writing, never created or truncated),
/// in parallel over a thread pool, then fsync each file if asked. Returns the bytes written.
/// Everything is validated before the first write.
pub fn write_regions(files: &[RegionFile<'_>], fsync: bool, threads: usize) -> Result<u64> {
    let mut handles = Vec::with_capacity(files.len());
    let mut jobs = Vec::new();
    let mut total = 0u64;
    for (i, f) in files.iter().enumerate() {
        let file = OpenOptions::new().write(true).open(&f.path).map_err(|e| {
            Error::io(
                &f.path,
                "cannot open the file to write this rank's bytes (do all ranks share the output filesystem?)",
                e,
            )
        })?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(&f.path, "cannot stat the file", e))?
            .len();
        let sorted = validate(&f.path, &f.regions, size)?;
        total += sorted.iter().map(|s| s.1).sum::<u64>();
        plan_jobs(i, &f.regions, &sorted, &mut jobs);
        handles.push(file);
    }
    let run = |job: &Job<'_>| -> Result<()> {
        for s in &job.slices {
            prefault(s);
        }
        pwritev_all(&handles[job.file], &job.slices, job.offset).map_err(|e| {
            let bytes: usize = job.slices.iter().map(|s| s.len()).sum();
            Error::io(
                &files[job.file].path,
                format!("cannot write {bytes} bytes at offset {}", job.offset),
                e,
            )
        })
    };
    let sync = |i: usize| -> Result<()> {
        handles[i]
            .sync_all()
            .map_err(|e| Error::io(&files[i].path, "cannot fsync the file", e))
    };
    let threads = effective_threads(threads).min(jobs.len().max(1));
    if threads <= 1 {
        jobs.iter().try_for_each(run)?;
        if fsync {
            (0..handles.len()).try_for_each(sync)?;
        }
    } else {
        let pool = build_pool(threads)?;
        pool.install(|| -> Result<()> {
            jobs.par_iter().try_for_each(run)?;
            if fsync {
                (0..handles.len()).into_par_iter().try_for_each(sync)?;
            }
            Ok(())
        })?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::fresh_layout;

    fn header_for(n: usize) -> Vec<u8> {
        fresh_layout(&["t".to_string()], &["U8".to_string()], &[vec![n]], None)
            .unwrap()
            .header
    }

    /// `write_regions` of one buffer into one file.
    fn write_one(path: &Path, data: &[u8], segments: Vec<Segment>, threads: usize) -> Result<u64> {
        write_regions(
            &[RegionFile {
                path: path.to_path_buf(),
                regions: vec![Region { data, segments }],
            }],
            false,
            threads,
        )
    }

    /// A file of one `n`-byte tensor, created at full size: (path, header, size).
    fn created(dir: &Path, name: &str, n: usize) -> (PathBuf, Vec<u8>, u64) {
        let header = header_for(n);
        let path = dir.join(name);
        let size = (header.len() + n) as u64;
        create_files(
            &[NewFile {
                path: path.clone(),
                header: &header,
                size,
            }],
            false,
        )
        .unwrap();
        (path, header, size)
    }

    #[test]
    fn scattered_rows_land_where_asked() {
        let dir = tempfile::tempdir().unwrap();
        let n = 64usize;
        let (path, header, _) = created(dir.path(), "a.safetensors", n);
        let data: Vec<u8> = (0..n as u8).collect();
        let base = header.len() as u64;
        // reverse the 16 rows of 4 bytes, from two "ranks" in two calls
        for half in 0..2 {
            let segments = (0..8)
                .map(|i| {
                    let row = half * 8 + i;
                    Segment {
                        src: (row * 4) as u64,
                        dst: base + ((15 - row) * 4) as u64,
                        len: 4,
                    }
                })
                .collect();
            write_regions(
                &[RegionFile {
                    path: path.clone(),
                    regions: vec![Region {
                        data: &data,
                        segments,
                    }],
                }],
                true,
                2,
            )
            .unwrap();
        }
        let out = fs::read(&path).unwrap();
        assert_eq!(&out[..header.len()], &header[..]);
        for row in 0..16 {
            assert_eq!(
                &out[header.len() + (15 - row) * 4..header.len() + (16 - row) * 4],
                &data[row * 4..row * 4 + 4]
            );
        }
    }

    #[test]
    fn overlaps_and_out_of_bounds_are_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let (path, header, size) = created(dir.path(), "b.safetensors", 16);
        let data = [7u8; 16];
        let base = header.len() as u64;
        let bad = |segments: Vec<Segment>| {
            write_one(&path, &data, segments, 1)
                .unwrap_err()
                .to_string()
        };
        let overlap = bad(vec![
            Segment {
                src: 0,
                dst: base,
                len: 8,
            },
            Segment {
                src: 8,
                dst: base + 4,
                len: 8,
            },
        ]);
        assert!(overlap.contains("written twice"), "{overlap}");
        assert!(bad(vec![Segment {
            src: 10,
            dst: base,
            len: 8
        }])
        .contains("outside its buffer"));
        assert!(bad(vec![Segment {
            src: 0,
            dst: size - 4,
            len: 8
        }])
        .contains("outside the file"));
        // nothing was written: the data area is still zeros
        let out = fs::read(&path).unwrap();
        assert!(out[header.len()..].iter().all(|&b| b == 0));
        // a missing file is an I/O error naming it
        let missing = dir.path().join("missing.safetensors");
        let err = write_regions(
            &[RegionFile {
                path: missing.clone(),
                regions: vec![],
            }],
            false,
            1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("missing.safetensors"));
    }

    #[test]
    fn create_refuses_wrong_sizes_and_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let header = header_for(8);
        let path = dir.path().join("c.safetensors");
        let wrong = create_files(
            &[NewFile {
                path: path.clone(),
                header: &header,
                size: 3,
            }],
            false,
        );
        assert!(wrong.is_err() && !path.exists());
        let ok = NewFile {
            path: path.clone(),
            header: &header,
            size: (header.len() + 8) as u64,
        };
        create_files(std::slice::from_ref(&ok), false).unwrap();
        assert!(create_files(&[ok], false).is_err());
    }

    #[test]
    fn long_runs_split_into_iov_max_calls() {
        let dir = tempfile::tempdir().unwrap();
        let rows = 3000usize;
        let (path, header, _) = created(dir.path(), "d.safetensors", rows * 2);
        // every other byte pair from the source: src not contiguous, dst contiguous
        let data: Vec<u8> = (0..rows * 4).map(|i| (i % 251) as u8).collect();
        let base = header.len() as u64;
        let segments = (0..rows)
            .map(|r| Segment {
                src: (r * 4) as u64,
                dst: base + (r * 2) as u64,
                len: 2,
            })
            .collect();
        write_one(&path, &data, segments, 2).unwrap();
        let out = fs::read(&path).unwrap();
        for r in 0..rows {
            assert_eq!(
                &out[header.len() + r * 2..header.len() + r * 2 + 2],
                &data[r * 4..r * 4 + 2]
            );
        }
    }
}
