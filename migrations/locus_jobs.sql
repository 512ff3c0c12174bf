-- Hours whose raw points changed since their last rollup. Writers add a row
-- per touched hour in the same transaction as the points (no unique key, so
-- parallel writers never wait on each other); the rollup deletes what it
-- recomputed.
CREATE TABLE locus_rollup_pending (
    hour timestamptz NOT NULL
);

-- The history of locus's own scheduled jobs, for `locus doctor`.
CREATE TABLE locus_job_runs (
    job         text        NOT NULL,
    started_at  timestamptz NOT NULL,
    duration_ms bigint      NOT NULL,
    ok          boolean     NOT NULL,
    detail      text        NOT NULL
);
CREATE INDEX locus_job_runs_job_started_at_idx ON locus_job_runs (job, started_at DESC);
