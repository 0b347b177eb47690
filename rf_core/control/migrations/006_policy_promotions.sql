-- 006: a policy decision may be a promotion ('promote', status 'noted'): a rung template's verdict that a run
-- goes on past a rung. It queues no op; it is recorded so that the promotion is final and the policy's later
-- snapshots know which runs it promoted, and in what order. DuckDB cannot alter a CHECK constraint, so the table
-- is rebuilt with the same columns and rows (its sequence is kept, so decision ids go on where they were).

CREATE TABLE policy_decisions_006 (
    decision_id BIGINT PRIMARY KEY DEFAULT nextval('policy_decisions_id_seq'),
    experiment VARCHAR NOT NULL,
    policy VARCHAR NOT NULL,
    run_id INTEGER NOT NULL,
    boundary INTEGER NOT NULL,
    kind VARCHAR NOT NULL CHECK (kind IN ('stop', 'resume', 'clone', 'delete', 'promote')),
    payload VARCHAR,
    reason VARCHAR NOT NULL,
    status VARCHAR NOT NULL
        CHECK (status IN ('submitted', 'rejected', 'proposed', 'approved', 'dismissed', 'noted')),
    op_id BIGINT,
    problems VARCHAR,
    decided_at DOUBLE NOT NULL,
    resolved_by VARCHAR,
    resolved_at DOUBLE
);

INSERT INTO policy_decisions_006 SELECT * FROM policy_decisions;
DROP TABLE policy_decisions;
ALTER TABLE policy_decisions_006 RENAME TO policy_decisions;
