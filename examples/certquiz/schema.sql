-- certquiz: schema of a certification-exam quiz application (the dbpolicy seed scenario).
--
-- Load into a fresh PostgreSQL 15+ database:
--   psql -v ON_ERROR_STOP=1 -d certquiz -f examples/certquiz/schema.sql
--
-- What this file deliberately leaves to examples/certquiz/policy.yaml (the "phase 2" plan):
-- the partitions of audit_logs (it is declared PARTITION BY RANGE with no partition, so no
-- row can be written to it until the policy has created them), row-level security on
-- user_progress and problem_reports, autovacuum tuning, the category_statistics
-- materialized view, the expression and partial indexes, and the feature_flags table.

BEGIN;

-- gen_random_uuid() is built in since PostgreSQL 13; no extension needed.

CREATE TABLE users (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email          text NOT NULL,
    display_name   text NOT NULL,
    role           text NOT NULL DEFAULT 'learner' CHECK (role IN ('learner', 'editor', 'admin')),
    locale         text NOT NULL DEFAULT 'en',
    is_active      boolean NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_login_at  timestamptz,
    CONSTRAINT users_email_format CHECK (email LIKE '%_@_%')
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE exams (
    id             integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code           text NOT NULL UNIQUE,                -- e.g. '200-301'
    name           text NOT NULL,                       -- e.g. 'Cisco CCNA'
    vendor         text NOT NULL,
    version        text,
    question_count integer NOT NULL CHECK (question_count > 0),
    duration_minutes integer NOT NULL CHECK (duration_minutes > 0),
    passing_score  numeric(5,2) NOT NULL CHECK (passing_score BETWEEN 0 AND 100),
    is_active      boolean NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE categories (
    id             integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slug           text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9_]+$'),  -- key in user_progress.category_stats
    name           text NOT NULL,
    parent_id      integer REFERENCES categories (id) ON DELETE SET NULL,
    description    text,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX categories_parent_id_idx ON categories (parent_id);

CREATE TABLE questions (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body           text NOT NULL,
    question_type  text NOT NULL DEFAULT 'single_choice'
                   CHECK (question_type IN ('single_choice', 'multiple_choice', 'drag_and_drop', 'simulation')),
    choices        jsonb NOT NULL DEFAULT '[]',          -- [{"key": "A", "text": "..."}, ...]
    correct_keys   text[] NOT NULL,
    explanation    text,
    reference_url  text,
    difficulty     smallint NOT NULL DEFAULT 3 CHECK (difficulty BETWEEN 1 AND 5),
    is_published   boolean NOT NULL DEFAULT false,
    created_by     uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX questions_created_by_idx ON questions (created_by);
CREATE INDEX questions_published_idx ON questions (id) WHERE is_published;

CREATE TABLE question_exams (
    question_id    bigint NOT NULL REFERENCES questions (id) ON DELETE CASCADE,
    exam_id        integer NOT NULL REFERENCES exams (id) ON DELETE CASCADE,
    PRIMARY KEY (question_id, exam_id)
);
CREATE INDEX question_exams_exam_id_idx ON question_exams (exam_id);

CREATE TABLE question_categories (
    question_id    bigint NOT NULL REFERENCES questions (id) ON DELETE CASCADE,
    category_id    integer NOT NULL REFERENCES categories (id) ON DELETE CASCADE,
    is_primary     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (question_id, category_id)
);
CREATE INDEX question_categories_category_id_idx ON question_categories (category_id);

-- One row per user and exam. category_stats holds per-category counters keyed by
-- categories.slug: {"ospf": {"answered": 40, "correct": 31, "accuracy": 0.775}, ...}
CREATE TABLE user_progress (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id            uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    exam_id            integer NOT NULL REFERENCES exams (id) ON DELETE CASCADE,
    questions_answered integer NOT NULL DEFAULT 0 CHECK (questions_answered >= 0),
    correct_answers    integer NOT NULL DEFAULT 0 CHECK (correct_answers >= 0),
    category_stats     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(category_stats) = 'object'),
    streak_days        integer NOT NULL DEFAULT 0,
    readiness_score    numeric(5,2),
    last_activity_at   timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, exam_id),
    CHECK (correct_answers <= questions_answered)
);
CREATE INDEX user_progress_exam_id_idx ON user_progress (exam_id);

CREATE TABLE problem_reports (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    question_id    bigint NOT NULL REFERENCES questions (id) ON DELETE CASCADE,
    reason         text NOT NULL CHECK (reason IN ('wrong_answer', 'typo', 'unclear', 'outdated', 'other')),
    details        text,
    status         text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'triaged', 'fixed', 'rejected')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    resolved_at    timestamptz,
    resolved_by    uuid REFERENCES users (id) ON DELETE SET NULL
);
CREATE INDEX problem_reports_user_id_idx ON problem_reports (user_id);
CREATE INDEX problem_reports_question_id_idx ON problem_reports (question_id);
CREATE INDEX problem_reports_open_idx ON problem_reports (created_at) WHERE status = 'open';

-- A quiz attempt: heavily updated while the user answers (hence the autovacuum tuning).
CREATE TABLE quiz_sessions (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    exam_id        integer NOT NULL REFERENCES exams (id) ON DELETE CASCADE,
    mode           text NOT NULL DEFAULT 'practice' CHECK (mode IN ('practice', 'timed', 'review')),
    status         text NOT NULL DEFAULT 'in_progress' CHECK (status IN ('in_progress', 'completed', 'abandoned')),
    question_ids   bigint[] NOT NULL DEFAULT '{}',
    answers        jsonb NOT NULL DEFAULT '{}',           -- {"<question_id>": ["A", "C"], ...}
    current_index  integer NOT NULL DEFAULT 0,
    correct_count  integer NOT NULL DEFAULT 0,
    score          numeric(5,2),
    started_at     timestamptz NOT NULL DEFAULT now(),
    completed_at   timestamptz,
    CHECK (completed_at IS NULL OR completed_at >= started_at)
);
CREATE INDEX quiz_sessions_user_started_idx ON quiz_sessions (user_id, started_at DESC);
CREATE INDEX quiz_sessions_exam_id_idx ON quiz_sessions (exam_id);

-- Append-only audit trail. Partitioned by month on created_at; the partitions (and the
-- DEFAULT partition) are created and retired by the policy, not here. The primary key
-- must include the partition key. The id comes from a plain sequence: identity columns on
-- partitioned tables need PostgreSQL 17.
CREATE SEQUENCE audit_logs_id_seq AS bigint;
CREATE TABLE audit_logs (
    id             bigint NOT NULL DEFAULT nextval('audit_logs_id_seq'::regclass),
    created_at     timestamptz NOT NULL DEFAULT now(),
    user_id        uuid,                                  -- no FK: audit rows outlive users
    action         text NOT NULL,                         -- 'login', 'login_failed', 'role_changed', ...
    entity_type    text,
    entity_id      text,
    ip_address     inet,
    user_agent     text,
    details        jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
ALTER SEQUENCE audit_logs_id_seq OWNED BY audit_logs.id;
CREATE INDEX audit_logs_user_id_created_at_idx ON audit_logs (user_id, created_at);

CREATE TABLE study_sessions (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    exam_id        integer REFERENCES exams (id) ON DELETE SET NULL,
    category_id    integer REFERENCES categories (id) ON DELETE SET NULL,
    activity       text NOT NULL DEFAULT 'reading' CHECK (activity IN ('reading', 'video', 'lab', 'flashcards', 'quiz')),
    started_at     timestamptz NOT NULL DEFAULT now(),
    ended_at       timestamptz,
    notes          text,
    CHECK (ended_at IS NULL OR ended_at >= started_at)
);
CREATE INDEX study_sessions_user_started_idx ON study_sessions (user_id, started_at DESC);

-- Per-question statistics, recomputed by a batch job from quiz_sessions.
CREATE TABLE question_difficulty (
    question_id      bigint PRIMARY KEY REFERENCES questions (id) ON DELETE CASCADE,
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    correct          integer NOT NULL DEFAULT 0 CHECK (correct >= 0),
    avg_time_seconds numeric(8,2),
    difficulty_score numeric(5,4) GENERATED ALWAYS AS
                     (CASE WHEN attempts = 0 THEN NULL
                           ELSE round(1 - correct::numeric / attempts, 4) END) STORED,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (correct <= attempts)
);

COMMIT;
