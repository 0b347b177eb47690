-- 003: what a run leaves behind, for `rf runs --json` and the dashboard: its loadable exports (latest chunk and
-- best chunk by the experiment's metric) and which chunk is its best.

ALTER TABLE runs ADD COLUMN export_latest VARCHAR;   -- folder of the latest chunk's loadable export
ALTER TABLE runs ADD COLUMN export_best VARCHAR;     -- folder of the best chunk's loadable export
ALTER TABLE runs ADD COLUMN best_step BIGINT;        -- the step at which the best chunk ended
ALTER TABLE runs ADD COLUMN best_value DOUBLE;       -- the experiment's metric at that step
