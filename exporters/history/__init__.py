"""History: downsampled per-entity series and the alert-transition log, as Parquet files
partitioned by day, queried with polars lazy scans (docs/history.md).

- `tables`: what is stored and how duplicate writes of one key merge.
- `store`: file layout, atomic writes, listing, scans that merge overlapping files by key.
- `writer`: ticks in, one row per entity per interval out, on its own thread.
- `maintenance`: compaction, sealing with rollups, retention.
- `compliance`, `queries`: what the API and the CLI answer; `params` parses what users type,
  `output` formats answers; `http` serves `/api/v1/history/...`.
- `runtime`: the writer and maintenance threads the service starts from its configuration.
"""
