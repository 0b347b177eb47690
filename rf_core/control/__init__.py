"""What runs in the rf server: the only code that speaks SQL or changes a row.

`store` owns the DuckDB file (and `migrations/`); the service layer over it is split by resource: `ops` (IC Ops),
`experiments` (experiments and runs), `timeline` (chunk bookkeeping), `metrics` and `decisions` (policy
decisions). The Dash UI and the JSON API (`dash_app/`) call these functions; other processes reach them only over HTTP
(tests and benchmarks also open a store in-process).
"""
