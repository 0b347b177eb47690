-- 007: a fit holds its experiment by a lease it renews; one whose lease lapsed is dead and is shown as crashed.
-- fit_epoch names the fit that holds the experiment: a fit presents its epoch, so an old fit that comes back after
-- another took over (or after a reservation for one) is refused at once. A reservation (fit_owner 'reserved: ...') holds the experiment
-- while a Prefect deployment starts the fit that continues it.

-- Epochs come from one sequence for the whole store, never reused: a fit that wakes after its experiment was deleted
-- (or renamed) and a new one took the name cannot pass for the new experiment's fit.
CREATE SEQUENCE fit_epoch_seq START 1;
ALTER TABLE experiments ADD COLUMN fit_epoch BIGINT DEFAULT 0;
ALTER TABLE experiments ADD COLUMN fit_owner VARCHAR;         -- 'host:pid' of the fit holding the lease
ALTER TABLE experiments ADD COLUMN fit_flow_run VARCHAR;      -- its Prefect flow run id, when it ran as one
ALTER TABLE experiments ADD COLUMN lease_expires_at DOUBLE;   -- NULL: never leased (created before 007)
ALTER TABLE experiments ADD COLUMN last_seen_at DOUBLE;       -- the fit's last renewal
