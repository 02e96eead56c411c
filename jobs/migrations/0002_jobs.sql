-- The job service's own tables. Procrastinate's (the queue) come from migration 0001.

CREATE TABLE api_users (
    name            text PRIMARY KEY,
    is_admin        boolean NOT NULL DEFAULT false,
    -- Standard Webhooks signing secret ("whsec_" + base64), per user.
    webhook_secret  text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Keys are stored as SHA-256 hashes: a leaked table grants nothing. A user may hold several.
CREATE TABLE api_keys (
    key_hash    text PRIMARY KEY,
    user_name   text NOT NULL REFERENCES api_users (name) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE video_jobs (
    id                text PRIMARY KEY,
    -- Creation order: lists and queue positions use it (ids are random).
    seq               bigserial UNIQUE,
    user_name         text NOT NULL REFERENCES api_users (name) ON DELETE CASCADE,
    model             text NOT NULL,
    status            text NOT NULL CHECK (status IN ('queued', 'in_progress', 'completed', 'failed', 'cancelled')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    completed_at      timestamptz,
    -- What is sent to the data plane (the user's fields and the seed; the image is in video_inputs).
    request           jsonb NOT NULL,
    -- The effective parameters (defaults applied), as the handler's rules computed them.
    parameters        jsonb NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}',
    webhook_url       text,
    step              integer,
    total_steps       integer,
    progress          integer NOT NULL DEFAULT 0,
    -- Seconds the data plane reported for the steps so far (for the ETA).
    elapsed_s         double precision,
    error             jsonb,
    result            jsonb,
    -- One entry per attempt on the data plane: endpoint, start, end, outcome.
    attempts          jsonb NOT NULL DEFAULT '[]',
    queue_job_id      bigint,
    idempotency_key   text,
    request_hash      text
);

CREATE INDEX video_jobs_user_seq ON video_jobs (user_name, seq DESC);
CREATE INDEX video_jobs_queued ON video_jobs (model, seq) WHERE status = 'queued';
CREATE UNIQUE INDEX video_jobs_idempotency ON video_jobs (user_name, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The input image (base64 text as sent to the data plane), apart from the row that lists read.
CREATE TABLE video_inputs (
    job_id  text PRIMARY KEY REFERENCES video_jobs (id) ON DELETE CASCADE,
    image   text NOT NULL
);

-- The poster frame (a small JPEG) of a finished video, kept with the record so that every API
-- replica can serve it whether the video itself lies in object storage or in a results folder.
CREATE TABLE video_posters (
    job_id  text PRIMARY KEY REFERENCES video_jobs (id) ON DELETE CASCADE,
    poster  bytea NOT NULL
);
