-- Example schema: a task-management app (projects, members, tasks, comments)
-- ==========================================================================
--
-- The example schema's tables, the rooms their changes go to, and the read policy, written as
-- SQL functions that the relay calls through pgrelay.can_read() / pgrelay.can_join(). Install the
-- trigger library (sql/pgrelay.sql) first. Safe to run again.
--
-- Read policy:
--   * a project, its members, its non-private tasks and their comments: every member of the project;
--   * a private task and its comments: its assignee, its creator, and the project's owners and admins;
--   * a project_members row: the project's members and the user it names (so a removed user learns it);
--   * nobody else sees anything of a project.

CREATE TABLE IF NOT EXISTS users (
    id   text PRIMARY KEY,
    name text NOT NULL
);

CREATE TABLE IF NOT EXISTS projects (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL,
    owner_id   text REFERENCES users,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now()
);

CREATE TABLE IF NOT EXISTS project_members (
    project_id bigint REFERENCES projects ON DELETE CASCADE,
    user_id    text REFERENCES users ON DELETE CASCADE,
    role       text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    PRIMARY KEY (project_id, user_id)
);
-- "Which projects is this user in" (joins, policies by user).
CREATE INDEX IF NOT EXISTS project_members_user_idx ON project_members (user_id);

CREATE TABLE IF NOT EXISTS tasks (
    id          bigserial PRIMARY KEY,
    project_id  bigint NOT NULL REFERENCES projects ON DELETE CASCADE,
    title       text NOT NULL,
    description text,
    status      text NOT NULL DEFAULT 'todo',
    priority    int,
    assignee_id text REFERENCES users,
    created_by  text REFERENCES users,
    is_private  boolean NOT NULL DEFAULT false,
    created_at  timestamptz DEFAULT now(),
    updated_at  timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS tasks_project_idx ON tasks (project_id);

CREATE TABLE IF NOT EXISTS comments (
    id         bigserial PRIMARY KEY,
    task_id    bigint NOT NULL REFERENCES tasks ON DELETE CASCADE,
    project_id bigint NOT NULL REFERENCES projects ON DELETE CASCADE,
    author_id  text REFERENCES users,
    body       text NOT NULL,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS comments_task_idx ON comments (task_id);

-- ---------------------------------------------------------------------------------------------
-- Read policy. Each function answers "may this user see this row?" from the row's own values
-- (so it also works for deleted rows) and the current memberships.
--
-- Postgres inlines a LANGUAGE sql function into the relay's batched authorization query only
-- when its body is a bare expression: no FROM, no subquery. Any other SQL function is run
-- through a fresh executor at every call (tens of microseconds, per user and row), while a
-- PL/pgSQL function keeps its plans for the session. So the expressions below are SQL, and the
-- functions that query a table are PL/pgSQL (join checks take about half as long so).
-- ---------------------------------------------------------------------------------------------

-- The user's role in a project, or NULL when not a member.
CREATE OR REPLACE FUNCTION project_role(user_id text, project_id bigint) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT m.role FROM project_members m WHERE m.project_id = $2 AND m.user_id = $1);
END $$;

-- A task (given as its row) is visible to members; a private one only to its assignee, its creator,
-- and the project's owners and admins.
CREATE OR REPLACE FUNCTION can_read_task(user_id text, claims jsonb, "row" jsonb) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN project_role($1, ($3 ->> 'project_id')::bigint) IS NULL THEN false
        WHEN NOT coalesce(($3 ->> 'is_private')::boolean, false) THEN true
        WHEN $1 IN ($3 ->> 'assignee_id', $3 ->> 'created_by') THEN true
        ELSE project_role($1, ($3 ->> 'project_id')::bigint) IN ('owner', 'admin')
    END
$$;

CREATE OR REPLACE FUNCTION can_read_project(user_id text, claims jsonb, "row" jsonb) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT project_role($1, ($3 ->> 'id')::bigint) IS NOT NULL
$$;

CREATE OR REPLACE FUNCTION can_read_project_member(user_id text, claims jsonb, "row" jsonb) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT $1 = $3 ->> 'user_id' OR project_role($1, ($3 ->> 'project_id')::bigint) IS NOT NULL
$$;

-- A comment follows its task. A comment whose task is gone (deleted in the same transaction) is
-- visible to nobody: its readers learn of the deletion from the task_deleted event.
CREATE OR REPLACE FUNCTION can_read_comment(user_id text, claims jsonb, "row" jsonb) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN coalesce((SELECT can_read_task($1, $2, to_jsonb(t))
                     FROM tasks t WHERE t.id = ($3 ->> 'task_id')::bigint), false);
END $$;

-- Who may join which room: project:{id} members, task:{id} whoever may read the task,
-- user:{id} that user only (built into pgrelay).
CREATE OR REPLACE FUNCTION can_join_project(user_id text, claims jsonb, key text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT $3 ~ '^[0-9]{1,18}$' AND project_role($1, $3::bigint) IS NOT NULL
$$;

CREATE OR REPLACE FUNCTION can_join_task(user_id text, claims jsonb, key text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN $3 ~ '^[0-9]{1,18}$'
       AND coalesce((SELECT can_read_task($1, $2, to_jsonb(t)) FROM tasks t WHERE t.id = $3::bigint), false);
END $$;

-- ---------------------------------------------------------------------------------------------
-- What is captured, where it goes, and who may join.
-- ---------------------------------------------------------------------------------------------

-- policy_columns / policy_tables say what each policy reads, so that relays may remember a user's
-- answer for rows that agree on those columns, until a change to one of those tables arrives.
-- They must be complete: a policy that read another column or table without saying so could be
-- answered from a stale memory.
SELECT pgrelay.watch('projects', rooms => ARRAY['project:{id}'], policy => 'can_read_project',
                     policy_columns => ARRAY['id'], policy_tables => ARRAY['project_members'::regclass]);
SELECT pgrelay.watch('project_members', rooms => ARRAY['project:{project_id}', 'user:{user_id}'],
                     policy => 'can_read_project_member',
                     policy_columns => ARRAY['project_id', 'user_id'],
                     policy_tables => ARRAY['project_members'::regclass]);
SELECT pgrelay.watch('tasks', rooms => ARRAY['project:{project_id}', 'task:{id}'], policy => 'can_read_task',
                     policy_columns => ARRAY['project_id', 'is_private', 'assignee_id', 'created_by'],
                     policy_tables => ARRAY['project_members'::regclass]);
-- A comment's policy reads its task (privacy, assignee), so any task change makes its answers stale.
SELECT pgrelay.watch('comments', rooms => ARRAY['project:{project_id}', 'task:{task_id}'],
                     policy => 'can_read_comment',
                     policy_columns => ARRAY['task_id'],
                     policy_tables => ARRAY['tasks'::regclass, 'project_members'::regclass]);

-- policy_tables: what each join policy reads, so that a membership change re-checks the members of
-- those rooms at once (a removed member leaves them, presence and typing included, right after the
-- change). A task's own changes need no declaration: a member who can no longer read the task is
-- denied its next change, which re-checks access to the room.
SELECT pgrelay.allow_join('project', 'can_join_project', policy_tables => ARRAY['project_members'::regclass]);
SELECT pgrelay.allow_join('task', 'can_join_task', policy_tables => ARRAY['project_members'::regclass]);
