"""Checkpoint file formats: safetensors headers and folder scans, the index, torch ``.bin``/``.pt``
files, and layout plans (which key goes to which shard, original vs fresh headers). No storage
decisions here: the bytes are read and written through ``shardwise.store``."""
