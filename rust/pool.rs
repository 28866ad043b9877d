//! The thread pools of the writers: how many threads a call gets, and the pool itself.

use std::io;

use crate::error::{Error, Result};

/// Most threads a pool may have, whatever is asked.
pub const MAX_THREADS: usize = 256;

/// A rayon pool of `threads` threads (0: one per available CPU), at most [`MAX_THREADS`].
pub fn build_pool(threads: usize) -> Result<rayon::ThreadPool> {
    let n = effective_threads(threads);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("shardwise-io-{i}"))
        .build()
        .map_err(|e| {
            Error::io(
                "<thread pool>",
                format!("cannot start {n} threads"),
                io::Error::other(e),
            )
        })
}

pub(crate) fn effective_threads(threads: usize) -> usize {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    n.clamp(1, MAX_THREADS)
}
