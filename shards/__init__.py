"""WebDataset shard I/O: atomic writer, manifest, reader, verify."""
