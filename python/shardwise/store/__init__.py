"""Where checkpoints live: one storage interface with a local backend (zero-copy maps, native
positional writes, fsync, rename) and an fsspec backend (ranged GETs, a download cache, multipart
uploads, a completion marker). Only this package decides whether a location is a URL."""
