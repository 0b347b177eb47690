-- 005: how many of a run's training rows were cut to its max_length, so truncation is reported, never silent.

ALTER TABLE runs ADD COLUMN truncated_rows BIGINT;  -- NULL: not known yet (no chunk trained, or runs before 005)
