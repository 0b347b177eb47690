-- 004: the functions an experiment registers by name (a config's formatting_func and compute_metrics name one of
-- them), so that a clone naming a function the experiment does not have is refused when it is submitted.

ALTER TABLE experiments ADD COLUMN functions VARCHAR;  -- JSON list of names; NULL: none (experiments before 004)
