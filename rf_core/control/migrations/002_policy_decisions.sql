-- Policy decisions: every op a policy submitted or proposed, keyed by (experiment, policy, run, chunk boundary).
-- A policy acts on a run at most once per boundary, whether it runs inside the fit flow or as a scheduled
-- deployment: rf_core.ops checks this table before writing, inside the store's serialised write transaction
-- (no UNIQUE index: DuckDB rewrites indexed rows on UPDATE, which a later status change would trip over).
-- Proposals (semi-automated mode) wait here until a person approves (the op is then queued, `resolved_by`
-- is the approver and the op's `who`) or dismisses them.

CREATE SEQUENCE policy_decisions_id_seq START 1;

CREATE TABLE policy_decisions (
    decision_id BIGINT PRIMARY KEY DEFAULT nextval('policy_decisions_id_seq'),
    experiment VARCHAR NOT NULL,
    policy VARCHAR NOT NULL,               -- the policy's name; its ops have source 'policy:<name>'
    run_id INTEGER NOT NULL,               -- the run the op targets (a clone's parent)
    boundary INTEGER NOT NULL,             -- the run's chunks_done when the policy decided
    kind VARCHAR NOT NULL CHECK (kind IN ('stop', 'resume', 'clone', 'delete')),
    payload VARCHAR,                       -- JSON: the op's request payload (a clone's overrides, warm start)
    reason VARCHAR NOT NULL,               -- the policy's own words for why
    status VARCHAR NOT NULL
        CHECK (status IN ('submitted', 'rejected', 'proposed', 'approved', 'dismissed')),
    op_id BIGINT,                          -- the op it queued (submitted, approved)
    problems VARCHAR,                      -- JSON list: why the op was rejected
    decided_at DOUBLE NOT NULL,
    resolved_by VARCHAR,                   -- who approved or dismissed a proposal
    resolved_at DOUBLE
);
