-- 001: the first schema. Times are Unix epoch seconds (DOUBLE): they travel through the JSON API unchanged.
-- JSON columns are VARCHAR holding JSON text, so no DuckDB extension is needed (none can be installed offline).

CREATE TABLE experiments (
    name VARCHAR PRIMARY KEY,
    status VARCHAR NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'finished')),
    num_chunks INTEGER NOT NULL CHECK (num_chunks >= 1),
    seed BIGINT NOT NULL,
    metric VARCHAR NOT NULL DEFAULT 'eval_loss',
    mode VARCHAR NOT NULL DEFAULT 'min' CHECK (mode IN ('min', 'max')),
    spec_ref VARCHAR,                      -- 'module:function' that rebuilds the ExperimentSpec, or NULL
    created_at DOUBLE NOT NULL,
    ended_at DOUBLE
);

CREATE TABLE runs (
    experiment VARCHAR NOT NULL,
    run_id INTEGER NOT NULL,               -- 1..n within its experiment
    status VARCHAR NOT NULL
        CHECK (status IN ('New', 'Ongoing', 'Stopped', 'Completed', 'Failed', 'Deleted')),
    config VARCHAR NOT NULL,               -- JSON: the normalised config
    source VARCHAR NOT NULL,               -- 'initial', 'user', 'cli' or 'policy:<name>'
    parent_id INTEGER,
    warm_start VARCHAR NOT NULL DEFAULT 'off' CHECK (warm_start IN ('off', 'weights', 'weights+optimizer')),
    warm_start_checkpoint VARCHAR,         -- the parent's checkpoint this clone starts from
    parent_step BIGINT,                    -- the parent's step when the clone op was applied
    ended_by VARCHAR,                      -- op id that stopped/deleted it, or 'completed' / 'failed'
    epoch INTEGER NOT NULL DEFAULT 0,
    chunks_done INTEGER NOT NULL DEFAULT 0,
    total_chunks INTEGER,
    step BIGINT NOT NULL DEFAULT 0,
    samples BIGINT NOT NULL DEFAULT 0,
    checkpoint VARCHAR,                    -- latest good checkpoint
    error VARCHAR,
    traceback VARCHAR,
    created_at DOUBLE NOT NULL,
    updated_at DOUBLE NOT NULL,
    PRIMARY KEY (experiment, run_id)
);

CREATE SEQUENCE ops_op_id_seq START 1;

CREATE TABLE ops (
    op_id BIGINT PRIMARY KEY DEFAULT nextval('ops_op_id_seq'),
    experiment VARCHAR NOT NULL,
    run_id INTEGER NOT NULL,
    kind VARCHAR NOT NULL CHECK (kind IN ('stop', 'resume', 'clone', 'delete')),
    payload VARCHAR NOT NULL,              -- JSON; for a clone it lists every config the op will create
    source VARCHAR NOT NULL,
    who VARCHAR,
    status VARCHAR NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'applied', 'skipped')),
    reason VARCHAR,                        -- why it was skipped
    result VARCHAR,                        -- JSON, e.g. {"created_run_ids": [4, 5]}
    submitted_at DOUBLE NOT NULL,
    applied_at DOUBLE
);

-- Long format, appended in bulk; no index: DuckDB's zone maps serve the per-experiment scans.
CREATE TABLE metrics (
    experiment VARCHAR NOT NULL,
    run_id INTEGER NOT NULL,
    step BIGINT NOT NULL,
    name VARCHAR NOT NULL,
    value DOUBLE,
    chunk INTEGER,
    time DOUBLE NOT NULL
);

-- One row per metric batch ever inserted, so a batch a client retries is stored exactly once.
CREATE TABLE metric_batches (
    batch_id VARCHAR PRIMARY KEY,
    num_rows INTEGER NOT NULL,
    received_at DOUBLE NOT NULL
);

CREATE SEQUENCE timeline_id_seq START 1;

CREATE TABLE timeline (
    id BIGINT PRIMARY KEY DEFAULT nextval('timeline_id_seq'),
    experiment VARCHAR NOT NULL,
    run_id INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    chunk INTEGER NOT NULL,                -- the run's 0-based chunk index
    "start" DOUBLE NOT NULL,
    "end" DOUBLE,
    outcome VARCHAR                        -- 'ok', 'completed' or 'failed' once the chunk ended
);
