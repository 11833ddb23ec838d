-- pgrelay trigger library
-- ========================
--
-- Everything pgrelay needs inside the database lives in the schema `pgrelay`. This file is safe to
-- run again at any time (it is how the library is upgraded): it creates what is missing, replaces
-- functions, and keeps the configuration you made with pgrelay.watch() and pgrelay.allow_join().
--
-- How a change travels:
--
--   1. pgrelay.watch('tasks', ...) installs three statement-level triggers on `tasks`. Each one runs
--      once per INSERT/UPDATE/DELETE statement, however many rows the statement touched, and copies
--      the touched rows into the outbox `pgrelay.changes` inside the writing transaction. The change
--      therefore commits, or rolls back, together with the data. (A fourth, AFTER TRUNCATE,
--      records an invalidation: see "Invalidations".)
--   2. If a relay is asleep, the trigger then sends `NOTIFY pgrelay` with an empty payload (see
--      "Waking relays" below: a relay that is busy reading needs no wake-up, and a NOTIFY costs
--      the commit a cluster-wide lock). It is only a wake-up: Postgres folds identical
--      notifications of one transaction into one, and the payload never carries the row, so the
--      8000-byte NOTIFY limit cannot be reached whatever the size of the row.
--   3. The relay reads the outbox by transaction snapshots (see pgrelay.changes_between below), which
--      yields every committed change exactly once, in commit order, and never waits for a slow
--      transaction that has not committed yet.
--   4. For every change the relay asks pgrelay.can_read() which of its connected users may see it,
--      and pgrelay.can_join() when a user asks to join a room. Both dispatch to functions you
--      register, so who-sees-what is decided here, in SQL, by the DBA.
--
-- Requires PostgreSQL 13 or newer (xid8 and the pg_snapshot functions).

-- Serialize concurrent installs (two relays starting at once) for the rest of this transaction.
DO $$ BEGIN PERFORM pg_advisory_xact_lock(hashtext('pgrelay.install')); END $$;

CREATE SCHEMA IF NOT EXISTS pgrelay;
COMMENT ON SCHEMA pgrelay IS 'pgrelay: change capture (outbox), resume positions and authorization dispatch';

-- ---------------------------------------------------------------------------------------------
-- The outbox
-- ---------------------------------------------------------------------------------------------

-- Retention works like Skytools PgQ: the outbox is three partitions ("generations") used in turn.
-- New changes go to the current one; pgrelay.maintain() (which the relay calls every few seconds)
-- moves on to the next one once the current one is `keep` old, and empties a partition with a
-- TRUNCATE once its changes are `keep` past their commit. No DELETE of millions of rows, no bloat,
-- no long lock (the TRUNCATE gives up after 50 ms and is retried later).
--
-- The current generation is the sequence's value modulo 3. Triggers read it without a snapshot, so
-- a switch is seen by every statement at once: that is what lets maintain() know which
-- transactions may still write into a generation it has left (see pgrelay.maintain()).
-- They read it with pg_sequence_last_value() (what the pg_sequences view uses), which is cheaper
-- per statement than a subquery on the sequence; it is NULL until the first nextval(), when the
-- value is the start value, 0. The read is the default of changes.gen, evaluated for each row as
-- it is written (see the column).
CREATE SEQUENCE IF NOT EXISTS pgrelay.generation MINVALUE 0 START 0;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_class WHERE oid = to_regclass('pgrelay.changes') AND relkind = 'r') THEN
        RAISE EXCEPTION 'pgrelay.changes has the pre-release (unpartitioned) layout'
            USING HINT = 'Deliver or discard its changes, then DROP SCHEMA pgrelay CASCADE and install again.';
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS pgrelay.changes (
    id      bigint GENERATED ALWAYS AS IDENTITY,
    -- The partition: pgrelay.generation modulo 3 when written. A default rather than a value in
    -- the capture functions' SELECT: pg_sequence_last_value() is volatile, and a volatile call in
    -- the SELECT of an INSERT ... SELECT keeps the planner from flattening it (a Subquery Scan in
    -- every captured statement's plan). As a default it is computed by the INSERT.
    gen     smallint    NOT NULL
            DEFAULT (coalesce(pg_sequence_last_value('pgrelay.generation'), 0) % 3)::smallint,
    -- The writing transaction. Snapshots tell which transactions had committed when, so this column
    -- is what lets a reader find changes in commit order without skipping late committers.
    xid     xid8        NOT NULL DEFAULT pg_current_xact_id(),
    tbl     text        NOT NULL,   -- table as clients see it: 'tasks', or 'schema.table' outside public
    entity  text        NOT NULL,   -- singular name used in event names: 'task' -> task_created
    op      text        NOT NULL,   -- 'INSERT', 'UPDATE' or 'DELETE
    rooms   text[]      NOT NULL,   -- rooms the change is published to
    "row"   jsonb       NOT NULL,   -- the new row; the old row for DELETE
    old     jsonb,                  -- UPDATE only: the old row (pgrelay.changes_between ships
                                    -- the previous values of the columns that changed)
    ts      timestamptz NOT NULL DEFAULT statement_timestamp(),
    -- Columns recorded for the policies but never shipped to clients (pgrelay.watch(exclude => ...)).
    hide    text[],
    PRIMARY KEY (id, gen)
) PARTITION BY LIST (gen);
COMMENT ON TABLE pgrelay.changes IS 'Outbox of captured changes, written by the triggers that pgrelay.watch() installs';
-- Columns added after the first release of this layout (idempotent upgrades).
ALTER TABLE pgrelay.changes ADD COLUMN IF NOT EXISTS hide text[];
-- With watch(include => ...): the only columns shipped (columns added later stay hidden).
ALTER TABLE pgrelay.changes ADD COLUMN IF NOT EXISTS show text[];
-- Installs before the generation was the column's default (a brief lock, only when upgrading).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attrdef AS d
                   JOIN pg_attribute AS a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                   WHERE d.adrelid = 'pgrelay.changes'::regclass AND a.attname = 'gen') THEN
        ALTER TABLE pgrelay.changes ALTER COLUMN gen
            SET DEFAULT (coalesce(pg_sequence_last_value('pgrelay.generation'), 0) % 3)::smallint;
    END IF;
END $$;
-- Only the capture functions write the outbox. A CHECK constraint on `op` cost every captured
-- statement a fresh parse of the constraint's expression (Postgres rebuilds it per statement).
ALTER TABLE pgrelay.changes DROP CONSTRAINT IF EXISTS changes_op_check;
CREATE TABLE IF NOT EXISTS pgrelay.changes_0 PARTITION OF pgrelay.changes FOR VALUES IN (0);
CREATE TABLE IF NOT EXISTS pgrelay.changes_1 PARTITION OF pgrelay.changes FOR VALUES IN (1);
CREATE TABLE IF NOT EXISTS pgrelay.changes_2 PARTITION OF pgrelay.changes FOR VALUES IN (2);

-- Readers look changes up by transaction id (ranges and in-progress lists of snapshots).
CREATE INDEX IF NOT EXISTS changes_xid_idx ON pgrelay.changes (xid);

-- The life of each generation.
CREATE TABLE IF NOT EXISTS pgrelay.generations (
    gen          smallint PRIMARY KEY CHECK (gen BETWEEN 0 AND 2),
    state        text NOT NULL CHECK (state IN ('current', 'sealed', 'empty')),
    since        timestamptz NOT NULL DEFAULT now(),  -- when it entered this state
    -- sealed: every transaction that wrote into it has an id below this ...
    sealed_xmax  xid8,
    -- ... and by this time all of them had ended.
    complete_at  timestamptz
);
INSERT INTO pgrelay.generations (gen, state)
SELECT g, CASE WHEN g = (SELECT last_value % 3 FROM pgrelay.generation) THEN 'current' ELSE 'empty' END
FROM generate_series(0, 2) AS g
ON CONFLICT (gen) DO NOTHING;

CREATE TABLE IF NOT EXISTS pgrelay.retention (
    singleton bool PRIMARY KEY DEFAULT true CHECK (singleton),
    keep      interval NOT NULL DEFAULT '1 hour' CHECK (keep >= '0'),  -- how long changes stay resumable
    -- Changes of transactions below this id may have been removed: a position whose snapshot had
    -- not seen all of them can no longer be resumed (the client refetches).
    horizon   xid8 NOT NULL DEFAULT '0'
);
INSERT INTO pgrelay.retention DEFAULT VALUES ON CONFLICT DO NOTHING;
COMMENT ON TABLE pgrelay.retention IS 'How long changes are kept for resume: UPDATE pgrelay.retention SET keep = ''6 hours''';

-- The key relays seal client positions with (so event ids reveal nothing about other changes).
-- Random per database, created once; every relay of this database reads the same key.
CREATE TABLE IF NOT EXISTS pgrelay.secrets (
    singleton    bool PRIMARY KEY DEFAULT true CHECK (singleton),
    position_key bytea NOT NULL CHECK (length(position_key) = 32)
        DEFAULT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')
);
INSERT INTO pgrelay.secrets DEFAULT VALUES ON CONFLICT DO NOTHING;

-- Before relays announced their sleep, writers either always notified or (pgrelay.set_notify(false))
-- never did. Writers now notify only while a relay sleeps (see "Waking relays"), which costs
-- nothing when writes are rare and avoids the NOTIFY's commit lock when they are not, so that
-- setting is gone.
DROP FUNCTION IF EXISTS pgrelay.set_notify(boolean);
DROP TABLE IF EXISTS pgrelay.settings;

-- ---------------------------------------------------------------------------------------------
-- Configuration
-- ---------------------------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS pgrelay.watches (
    tbl         regclass PRIMARY KEY,
    name        text     NOT NULL UNIQUE,  -- what pgrelay.changes.tbl holds for it
    entity      text     NOT NULL,
    rooms       text[]   NOT NULL,         -- templates such as 'project:{project_id}'
    policy      regprocedure,              -- fn(user_id text, claims jsonb, row jsonb) -> boolean
    exclude     text[]   NOT NULL DEFAULT '{}',
    old_values  boolean  NOT NULL DEFAULT true
);
-- Added after the first release (idempotent upgrades).
ALTER TABLE pgrelay.watches ADD COLUMN IF NOT EXISTS room_fn regprocedure;  -- fn(row jsonb) -> text[]
ALTER TABLE pgrelay.watches ADD COLUMN IF NOT EXISTS include text[];           -- NULL: all but `exclude`
-- What the read policy depends on (pgrelay.watch(policy_columns => ..., policy_tables => ...)), so
-- that relays may remember its answers. NULL policy_columns: answers are never remembered.
ALTER TABLE pgrelay.watches ADD COLUMN IF NOT EXISTS policy_columns text[];
ALTER TABLE pgrelay.watches ADD COLUMN IF NOT EXISTS policy_tables regclass[] NOT NULL DEFAULT '{}';
-- The table's other columns when watch() ran: removed from a row, they leave its policy key.
ALTER TABLE pgrelay.watches ADD COLUMN IF NOT EXISTS unkeyed text[];
-- Events whose row (with its old values) is larger than this many bytes of JSON are delivered
-- with just the primary key and "truncated": true, and clients refetch the row
-- (pgrelay.watch(max_event_bytes => ...); see docs/dba.md). The outbox still records the whole
-- row, and the policy still judges it whole.
ALTER TABLE pgrelay.watches ADD COLUMN IF NOT EXISTS max_event_bytes int NOT NULL DEFAULT 1048576
    CHECK (max_event_bytes > 0);
-- The primary key's columns: what a truncated event keeps (kept up to date by install_capture()).
ALTER TABLE pgrelay.watches ADD COLUMN IF NOT EXISTS key_columns text[] NOT NULL DEFAULT '{}';
COMMENT ON TABLE pgrelay.watches IS 'Tables whose changes are captured; edit with pgrelay.watch() / pgrelay.unwatch()';

CREATE TABLE IF NOT EXISTS pgrelay.join_rules (
    kind   text PRIMARY KEY CHECK (kind ~ '^[a-z_]+$'),
    policy regprocedure NOT NULL         -- fn(user_id text, claims jsonb, key text) -> boolean
);
-- The tables the join policy reads (pgrelay.allow_join(policy_tables => ...)). A change to one of them
-- makes relays ask the policy again, right after delivering that change, for every member of every
-- room of this kind, so that a member removed from a project leaves its rooms (events, presence and
-- typing) at that change. NULL: not declared; access is then re-checked only when a member is
-- denied a change in the room, and periodically (every relay, PGRELAY_RECHECK_INTERVAL).
ALTER TABLE pgrelay.join_rules ADD COLUMN IF NOT EXISTS policy_tables regclass[];
COMMENT ON TABLE pgrelay.join_rules IS 'Who may join rooms of each kind (the part before the colon); edit with pgrelay.allow_join()';

-- ---------------------------------------------------------------------------------------------
-- Reading changes in commit order
-- ---------------------------------------------------------------------------------------------

-- What clients see of a recorded row: only the `show` columns when set, never the `hide` ones.
CREATE OR REPLACE FUNCTION pgrelay.shipped(r jsonb, show text[], hide text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN r IS NULL THEN NULL
        WHEN show IS NULL THEN r - coalesce(hide, '{}')
        ELSE (SELECT coalesce(jsonb_object_agg(k, v), '{}') FROM jsonb_each(r) AS e(k, v)
              WHERE k = ANY (show) AND NOT k = ANY (coalesce(hide, '{}')))
    END
$$;

-- (Upgrades: the changed columns are computed when a change is read, see pgrelay.read_batch().)
DROP FUNCTION IF EXISTS pgrelay.changed_values(jsonb, jsonb);

-- The changes committed after snapshot `since` and no later than snapshot `upto`; ordered by
-- (txn_last, id), which its callers do, they come in commit order.
--
-- Outbox ids are handed out when a row is written, not when its transaction commits, so a reader
-- that remembers "the last id I saw" skips the rows of any transaction that committed after a
-- younger one. Snapshots do not have that problem: a change belongs to this batch exactly when its
-- transaction is visible in `upto` and was not visible in `since`. Every committed transaction
-- therefore lands in exactly one batch, and a transaction that stays open for an hour simply lands
-- in a later batch without holding anyone else back (the method of Skytools PgQ).
--
-- Only two places can hold such transactions, both cheap index lookups: transaction ids at or
-- above since's xmax, and the transactions that were still running when `since` was taken.
--
-- Within a batch, transactions are ordered by the last change each one wrote (txn_last). If
-- transaction B read or overwrote what A committed, B wrote after A's commit, so B's last change
-- is younger than all of A's: the order always agrees with what the data says happened first.
--
-- This is what relays read. Besides the change as clients see it, each row carries what a relay
-- needs to remember policy answers (see pgrelay.watch(policy_columns => ...)):
--   policy_key      the policy and the values of the columns it reads, from the full row (hidden
--                   columns included, though they never leave the database otherwise); NULL when
--                   the table's answers must not be remembered;
--   policy_key_old  the same for the row before an UPDATE;
--   knows_old       an UPDATE that recorded previous values, so its old version can be judged too;
--   flush           the tables whose remembered answers this change may have made wrong;
--   recheck         the kinds of rooms whose join policy reads this change's table
--                   (pgrelay.allow_join(policy_tables => ...)): relays ask that policy again for
--                   the members of those rooms once the change is delivered;
--   control         not a row change but an invalidation (pgrelay.capture_truncate(),
--                   pgrelay.function_changed()): relays forget every remembered answer and
--                   re-check every room. It is reported as an UPDATE with no rooms, so a relay
--                   older than this column delivers it to nobody.
-- `old` is the whole row before an UPDATE, with the same columns left out as from `row`: the
-- relay reduces it to the columns that changed (src/capture/changed.rs). Doing that here, with
-- jsonb_each over the old row, was the largest part of the read, on a backend that shares the
-- CPU with every writer; the relay does it far more cheaply.
-- The outbox rows a read between two snapshots may need: the transactions that started after
-- `since` was taken, and those that were still running then. Visibility in `upto` is checked by
-- the caller. Both parts must be index scans of the xid index, whatever the partitions' size:
--
-- A relay prepares its read once and Postgres keeps the plan. Planned while a partition is
-- nearly empty (a fresh install, or just after maintain() emptied it), a sequential scan looks
-- cheaper, and that plan stays as the partition fills: every read then scans the whole
-- partition, so under sustained writes each read gets slower as the partition fills, and the
-- relay's lag grows with it. So these two scans live in a PL/pgSQL function planned with
-- sequential scans off; its plan is cached per session like the caller's.
CREATE OR REPLACE FUNCTION pgrelay.outbox_between(since pg_snapshot, upto pg_snapshot)
RETURNS SETOF pgrelay.changes
LANGUAGE plpgsql STABLE SET enable_seqscan = off AS $$
BEGIN
    RETURN QUERY
        SELECT * FROM pgrelay.changes
        WHERE xid >= pg_snapshot_xmax(since) AND xid < pg_snapshot_xmax(upto)
        UNION ALL
        -- One index probe per transaction that was running at `since` (usually none). With
        -- `xid = ANY (...)` or a plain join the planner may scan the whole outbox instead;
        -- the fenced LATERAL keeps it to the probes.
        SELECT c.* FROM pg_snapshot_xip(since) AS r(xid)
        CROSS JOIN LATERAL (SELECT * FROM pgrelay.changes AS x WHERE x.xid = r.xid OFFSET 0) AS c;
END
$$;
COMMENT ON FUNCTION pgrelay.outbox_between(pg_snapshot, pg_snapshot) IS
    'The outbox rows between two snapshots, before visibility: index scans whatever the partitions'' size';

-- (Upgrades: a result without max_event_bytes and key_columns, or without recheck and control,
-- cannot be replaced in place. Only SQL function bodies call it, which Postgres does not track, so
-- dropping it is safe; this runs in the install's transaction, so no relay sees it missing.
-- Relays select its columns by name, so older relays keep working with this one.)
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_proc
               WHERE oid = to_regprocedure('pgrelay.read_batch(pg_snapshot, pg_snapshot)')
                 AND NOT 'control' = ANY (proargnames)) THEN
        DROP FUNCTION pgrelay.read_batch(pg_snapshot, pg_snapshot);
    END IF;
END $$;
CREATE OR REPLACE FUNCTION pgrelay.read_batch(since pg_snapshot, upto pg_snapshot)
RETURNS TABLE (
    id bigint, xid xid8, tbl text, entity text, op text, rooms text[], "row" jsonb, old jsonb,
    ts timestamptz, txn_last bigint,
    policy_key text, policy_key_old text, knows_old boolean, flush text[],
    max_event_bytes int, key_columns text[], recheck text[], control boolean
)
LANGUAGE sql STABLE AS $$
    -- What depends only on the table is computed once per read, one row per watched table, and
    -- looked up per change (MATERIALIZED: inlined, the planner joined it by a nested loop that
    -- re-ran the policy_tables check for every change). One
    -- lookup, not two: each join sorted or hashed the whole batch, wide rows and all.
    WITH per_table AS MATERIALIZED (
        SELECT x.name,
               -- A policy's answers may be remembered when it declared what it reads and every
               -- table it reads is watched: a change to an unwatched table would never reach the
               -- relays. NULL: not remembered.
               CASE WHEN x.policy IS NOT NULL AND x.policy_columns IS NOT NULL
                     AND NOT EXISTS (SELECT FROM unnest(x.policy_tables) AS d(t)
                                     WHERE NOT EXISTS (SELECT FROM pgrelay.watches AS y WHERE y.tbl = d.t))
                    THEN x.policy::oid::text END AS policy,
               x.unkeyed,
               x.max_event_bytes,
               x.key_columns,
               -- The tables whose policies read this one.
               coalesce((SELECT array_agg(DISTINCT w.name)
                         FROM pgrelay.watches AS w CROSS JOIN unnest(w.policy_tables) AS d(t)
                         WHERE d.t = x.tbl), '{}') AS flush,
               -- The kinds of rooms whose join policy reads this one.
               coalesce((SELECT array_agg(j.kind ORDER BY j.kind) FROM pgrelay.join_rules AS j
                         WHERE x.tbl = ANY (j.policy_tables)), '{}') AS recheck
        FROM pgrelay.watches AS x
    )
    SELECT c.id, c.xid, c.tbl, c.entity,
           CASE WHEN c.op IN ('TRUNCATE', 'INVALIDATE') THEN 'UPDATE' ELSE c.op END,
           c.rooms,
           -- What clients see, written out rather than calling SQL functions: Postgres cannot
           -- inline pgrelay.shipped() or a function with a FROM clause, and calling them was
           -- most of what a read cost.
           CASE WHEN c.show IS NULL THEN c."row" - coalesce(c.hide, '{}')
                ELSE pgrelay.shipped(c."row", c.show, c.hide) END,
           -- The old row, cut the same way: hidden columns never leave the database, not even
           -- for the relay, which only needs the shipped ones to tell what changed. (Without
           -- hidden columns, `-` with an empty array returns its input untouched.) Changes
           -- recorded by older versions hold just the changed columns; the relay's reduction
           -- leaves those as they are.
           CASE WHEN c.show IS NULL THEN c.old - coalesce(c.hide, '{}')
                ELSE pgrelay.shipped(c.old, c.show, c.hide) END,
           c.ts,
           c.txn_last,
           k.policy || ' ' || (c."row" - k.unkeyed)::text,
           -- The row before the UPDATE is the new row overwritten by the old values. Removing the
           -- unkeyed columns from each side first gives the same jsonb (hence the same text) as
           -- removing them from the merged row, and merges two small objects instead of two whole
           -- rows: merging whole rows with || cost more than the rest of the key.
           CASE WHEN c.knows_old
                THEN k.policy || ' ' || ((c."row" - k.unkeyed) || (c.old - k.unkeyed))::text END,
           c.knows_old,
           coalesce(k.flush, '{}'),
           -- What the relay needs to cut an oversized event down to its key (a table no longer
           -- watched: the default, and no key columns, so an oversized row becomes {}).
           coalesce(k.max_event_bytes, 1048576),
           coalesce(k.key_columns, '{}'),
           coalesce(k.recheck, '{}'),
           c.op IN ('TRUNCATE', 'INVALIDATE')
    FROM (
        SELECT o.*, max(o.id) OVER (PARTITION BY o.xid) AS txn_last,
               (o.op = 'UPDATE' AND o.old IS NOT NULL AND o.old <> '{}') AS knows_old
        FROM pgrelay.outbox_between(since, upto) AS o
        WHERE pg_visible_in_snapshot(o.xid, upto)
    ) AS c
    LEFT JOIN per_table AS k ON k.name = c.tbl
    -- Not sorted here: callers order by (txn_last, id) (the relay's READ_BATCH, pgrelay.batch()),
    -- and sorting the same rows twice is wasted work on every read.
$$;
COMMENT ON FUNCTION pgrelay.read_batch(pg_snapshot, pg_snapshot) IS
    'What relays read: the changes between two snapshots with whole old rows, plus the inputs for remembering policy answers';

-- pgrelay.read_batch() with `old` reduced to the previous values of the columns that changed, as
-- clients receive it, compared with jsonb's equality (numeric 1.0 equals 1.00). Relays before
-- read_batch() read this one, so it keeps its columns and their meaning while such a relay may
-- still run beside an upgraded library.
CREATE OR REPLACE FUNCTION pgrelay.batch(since pg_snapshot, upto pg_snapshot)
RETURNS TABLE (
    id bigint, xid xid8, tbl text, entity text, op text, rooms text[], "row" jsonb, old jsonb,
    ts timestamptz, txn_last bigint,
    policy_key text, policy_key_old text, knows_old boolean, flush text[]
)
LANGUAGE sql STABLE AS $$
    SELECT b.id, b.xid, b.tbl, b.entity, b.op, b.rooms, b."row",
           -- Hidden columns are already gone from both rows.
           CASE WHEN b.old IS NOT NULL THEN (
               SELECT coalesce(jsonb_object_agg(o.key, o.value), '{}')
               FROM jsonb_each(b.old) AS o
               WHERE b."row" -> o.key IS DISTINCT FROM o.value
           ) END,
           b.ts, b.txn_last, b.policy_key, b.policy_key_old, b.knows_old, b.flush
    FROM pgrelay.read_batch(since, upto) AS b
    ORDER BY b.txn_last, b.id
$$;
COMMENT ON FUNCTION pgrelay.batch(pg_snapshot, pg_snapshot) IS
    'pgrelay.read_batch() with old reduced to the changed columns, as clients see it';

-- The same changes, as clients see them: for DBAs and the pgrelay.lag view.
CREATE OR REPLACE FUNCTION pgrelay.changes_between(since pg_snapshot, upto pg_snapshot)
RETURNS TABLE (
    id bigint, xid xid8, tbl text, entity text, op text, rooms text[], "row" jsonb, old jsonb,
    ts timestamptz, txn_last bigint
)
LANGUAGE sql STABLE AS $$
    SELECT b.id, b.xid, b.tbl, b.entity, b.op, b.rooms, b."row", b.old, b.ts, b.txn_last
    FROM pgrelay.batch(since, upto) AS b
$$;
COMMENT ON FUNCTION pgrelay.changes_between(pg_snapshot, pg_snapshot) IS
    'Changes committed after snapshot since and visible in snapshot upto, in commit order, as clients see them';

-- A resume token for the calling transaction's snapshot. An API that reads its data and this
-- position in one transaction can hand both to a client; joining a room with `since` = the position
-- yields exactly the changes the data does not contain yet.
--
-- The token is sealed exactly as the relay seals the positions it hands out (the relay's source,
-- src/capture/seal.rs, explains the construction): encrypted and authenticated with the key in
-- pgrelay.secrets, so it tells the client nothing and the relay accepts only tokens made here or by
-- a relay. A plain snapshot sent by a client is refused. The sealed bytes are the snapshot in the
-- relay's binary form: a 0 tag, then LEB128 varints of xmin, xmax - xmin, the number of
-- in-progress transactions and each one's distance from xmin.
--
-- It needs pgcrypto (HMAC-SHA256 and AES-CBC), available on every managed Postgres we know of
-- (RDS, Cloud SQL, Azure, Supabase). Installed here if missing, in the install's default schema;
-- if it is installed already, wherever it is (pgrelay.position() calls it schema-qualified).
CREATE EXTENSION IF NOT EXISTS pgcrypto;

-- One LEB128 varint (the relay's encoding): 7 bits a byte, low bits first.
CREATE OR REPLACE FUNCTION pgrelay.varint(v bigint) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    out bytea := '';
BEGIN
    IF v < 0 THEN
        RAISE EXCEPTION 'pgrelay.varint: % is negative', v;
    END IF;
    WHILE v >= 128 LOOP
        out := out || set_byte('\x00'::bytea, 0, ((v & 127) | 128)::int);
        v := v >> 7;
    END LOOP;
    RETURN out || set_byte('\x00'::bytea, 0, v::int);
END $$;

-- SECURITY DEFINER: the calling roles (the application's) may not read pgrelay.secrets; only this
-- function and the relay's role do. Its search_path is pinned, and pgcrypto is called by its
-- schema-qualified name, so no role can slip in functions of its own. Generated, to find pgcrypto.
DO $install$
DECLARE
    crypto text := (SELECT n.nspname FROM pg_extension AS e
                    JOIN pg_namespace AS n ON n.oid = e.extnamespace WHERE e.extname = 'pgcrypto');
BEGIN
    EXECUTE format($f$
CREATE OR REPLACE FUNCTION pgrelay.position() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    snap  pg_snapshot := pg_current_snapshot();
    xmin  bigint := pg_snapshot_xmin(snap)::text::bigint;
    k     bytea := (SELECT position_key FROM pgrelay.secrets);
    plain bytea;
    iv    bytea;
    body  bytea;
BEGIN
    plain := '\x00'::bytea || pgrelay.varint(xmin)
             || pgrelay.varint(pg_snapshot_xmax(snap)::text::bigint - xmin)
             || pgrelay.varint((SELECT count(*) FROM pg_snapshot_xip(snap)))
             || coalesce((SELECT string_agg(pgrelay.varint(x::text::bigint - xmin), ''::bytea ORDER BY x)
                          FROM pg_snapshot_xip(snap) AS x), ''::bytea);
    -- The derived keys, the synthetic IV, CBC, then the tag over IV and ciphertext.
    iv := substring(%1$I.hmac(plain, %1$I.hmac('pgrelay position iv'::bytea, k, 'sha256'), 'sha256') FROM 1 FOR 16);
    body := iv || %1$I.encrypt_iv(plain, %1$I.hmac('pgrelay position enc'::bytea, k, 'sha256'), iv, 'aes-cbc/pad:pkcs');
    body := body || substring(%1$I.hmac(body, %1$I.hmac('pgrelay position mac'::bytea, k, 'sha256'), 'sha256') FROM 1 FOR 16);
    -- base64url without padding (encode() also breaks lines every 76 characters).
    RETURN 'q' || translate(encode(body, 'base64'), E'+/=\n', '-_');
END
$body$
$f$, crypto);
END $install$;
COMMENT ON FUNCTION pgrelay.position() IS 'Resume position for this transaction''s snapshot (join with since = it)';

-- ---------------------------------------------------------------------------------------------
-- Authorization dispatch
-- ---------------------------------------------------------------------------------------------

-- Rooms of the kind 'user:{id}' belong to that user alone.
CREATE OR REPLACE FUNCTION pgrelay.is_self(user_id text, claims jsonb, key text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT user_id = key $$;

INSERT INTO pgrelay.join_rules (kind, policy, policy_tables)
VALUES ('user', 'pgrelay.is_self(text, jsonb, text)'::regprocedure, '{}')
ON CONFLICT (kind) DO NOTHING;

-- (Re)writes pgrelay.can_read() and pgrelay.can_join() from the configuration tables, so that the
-- relay calls one plain SQL function that Postgres can inline, instead of looking policies up per row.
-- Both deny whatever has no rule. Policies are called by their schema-qualified names, so the
-- result does not depend on anyone's search_path.
CREATE OR REPLACE FUNCTION pgrelay.rebuild_dispatch() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    read_cases text := '';
    join_cases text := '';
    w record;
BEGIN
    FOR w IN SELECT name, pgrelay.qualified(policy) AS fn FROM pgrelay.watches WHERE policy IS NOT NULL ORDER BY name LOOP
        read_cases := read_cases || format(E'\n    WHEN tbl = %L THEN %s(user_id, claims, "row")', w.name, w.fn);
    END LOOP;
    FOR w IN SELECT kind, pgrelay.qualified(policy) AS fn FROM pgrelay.join_rules ORDER BY kind LOOP
        join_cases := join_cases || format(E'\n    WHEN starts_with(room, %L) THEN %s(user_id, claims, substr(room, %s))',
                                           w.kind || ':', w.fn, length(w.kind) + 2);
    END LOOP;

    EXECUTE format(
        'CREATE OR REPLACE FUNCTION pgrelay.can_read(tbl text, user_id text, claims jsonb, "row" jsonb) '
        'RETURNS boolean LANGUAGE sql STABLE AS %L',
        format(E'SELECT coalesce(CASE WHEN tbl IS NULL THEN false%s\n    ELSE false END, false)', read_cases));
    EXECUTE format(
        'CREATE OR REPLACE FUNCTION pgrelay.can_join(user_id text, claims jsonb, room text) '
        'RETURNS boolean LANGUAGE sql STABLE AS %L',
        format(E'SELECT coalesce(CASE WHEN room IS NULL THEN false%s\n    ELSE false END, false)', join_cases));
    COMMENT ON FUNCTION pgrelay.can_read(text, text, jsonb, jsonb) IS
        'Generated by pgrelay.rebuild_dispatch(): may user_id read this row of table tbl?';
    COMMENT ON FUNCTION pgrelay.can_join(text, jsonb, text) IS
        'Generated by pgrelay.rebuild_dispatch(): may user_id join this room?';
END $$;

-- pgrelay.can_read() that answers 't' or 'f', or, when the policy raises an error, that error's
-- SQLSTATE instead of failing. The relay asks this only after its batched query over a chunk of
-- (change, user) pairs failed: one guarded query then tells it exactly which pairs fail (those
-- are denied, logged and counted in pgrelay_policy_errors_total), and everyone else still gets
-- the chunk. Each call runs in a subtransaction, which is why the fast path does not use it.
-- A statement timeout is not caught here (it cancels the whole statement): the relay finds
-- those pairs by asking about halves of the chunk.
CREATE OR REPLACE FUNCTION pgrelay.can_read_guarded(tbl text, user_id text, claims jsonb, "row" jsonb)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN CASE WHEN pgrelay.can_read(tbl, user_id, claims, "row") THEN 't' ELSE 'f' END;
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE;
END $$;
COMMENT ON FUNCTION pgrelay.can_read_guarded(text, text, jsonb, jsonb) IS
    'pgrelay.can_read() answering t, f, or the SQLSTATE of the policy''s error (what relays ask when a chunk fails)';

-- A function's name as schema.name, quoted as needed.
CREATE OR REPLACE FUNCTION pgrelay.qualified(fn regprocedure) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format('%I.%I', n.nspname, p.proname)
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.oid = fn
$$;

-- Register who may join rooms of a kind: pgrelay.allow_join('project', 'can_join_project',
-- policy_tables => ARRAY['project_members'::regclass]). The policy is called as
-- policy(user_id text, claims jsonb, key text), key being the part after the first colon ('42' for
-- 'project:42'), and must return boolean. policy_tables: the tables it reads (see
-- pgrelay.join_rules.policy_tables); they must be watched to have an effect.
-- (Upgrades: the signature before policy_tables, which would make calls ambiguous.)
DROP FUNCTION IF EXISTS pgrelay.allow_join(text, regproc);
CREATE OR REPLACE FUNCTION pgrelay.allow_join(kind text, policy regproc, policy_tables regclass[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    fn regprocedure := pgrelay.check_policy(policy, 'text');
BEGIN
    INSERT INTO pgrelay.join_rules AS r (kind, policy, policy_tables)
    VALUES (allow_join.kind, fn, allow_join.policy_tables)
    ON CONFLICT ON CONSTRAINT join_rules_pkey
        DO UPDATE SET policy = excluded.policy, policy_tables = excluded.policy_tables;
    PERFORM pgrelay.rebuild_dispatch();
END $$;

-- Checks that a policy function has the signature (text, jsonb, <third>) returning boolean.
CREATE OR REPLACE FUNCTION pgrelay.check_policy(policy regproc, third text) RETURNS regprocedure
LANGUAGE plpgsql STABLE AS $$
DECLARE
    p pg_proc;
BEGIN
    SELECT * INTO p FROM pg_proc WHERE oid = policy;
    IF p.prorettype <> 'boolean'::regtype OR p.pronargs <> 3
       OR p.proargtypes[0] <> 'text'::regtype OR p.proargtypes[1] <> 'jsonb'::regtype
       OR p.proargtypes[2] <> third::regtype THEN
        RAISE EXCEPTION 'policy % must be declared as %(user_id text, claims jsonb, %) RETURNS boolean',
            policy, policy, CASE third WHEN 'jsonb' THEN 'row jsonb' ELSE 'key text' END;
    END IF;
    RETURN policy::oid::regprocedure;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Watching tables
-- ---------------------------------------------------------------------------------------------

-- Turns a room template into a SQL expression over the row alias `r`:
--   'project:{project_id}'  ->  'project:' || (r.project_id)::text
-- A NULL column yields a NULL room, which the trigger drops.
CREATE OR REPLACE FUNCTION pgrelay.room_expression(tbl regclass, template text, r text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    parts text[] := regexp_split_to_array(template, '[{}]');
    expr  text := '';
    i     int;
BEGIN
    IF array_length(parts, 1) % 2 = 0 THEN
        RAISE EXCEPTION 'room template % has an unmatched brace', template;
    END IF;
    FOR i IN 1 .. array_length(parts, 1) LOOP
        IF i % 2 = 1 THEN
            IF parts[i] <> '' THEN expr := expr || ' || ' || quote_literal(parts[i]); END IF;
        ELSE
            IF NOT EXISTS (SELECT FROM pg_attribute
                           WHERE attrelid = tbl AND attname = parts[i] AND attnum > 0 AND NOT attisdropped) THEN
                RAISE EXCEPTION 'room template % names column %, which % does not have', template, parts[i], tbl;
            END IF;
            expr := expr || format(' || (%s.%I)::text', r, parts[i]);
        END IF;
    END LOOP;
    RETURN substr(expr, 5);
END $$;

-- Start capturing a table's changes.
--
--   tbl         the table.
--   rooms       room templates; '{column}' is replaced by the row's value: ARRAY['project:{project_id}'].
--               An UPDATE goes to the rooms of the new row and of the old one (a task moved between
--               projects reaches both project rooms).
--   room_fn     for rooms that need a lookup: fn(row jsonb) RETURNS text[], called once per row
--               (in addition to the templates, which may then be empty).
--   policy      who may read a row: fn(user_id text, claims jsonb, row jsonb) RETURNS boolean.
--               Without one nobody receives the table's changes. It sees every column, including
--               excluded ones.
--   entity      singular name for event names (default: the table name without its plural 's'):
--               'task' gives task_created, task_updated, task_deleted.
--   exclude     columns never shipped to clients (e.g. password_hash); include = the only columns
--               shipped. They are still recorded in the outbox, for the policy, until retention
--               removes them.
--   old_values  record the previous values of changed columns on UPDATE (needed to tell users who
--               could see the old version but not the new one that the row left their view).
--   policy_columns, policy_tables
--               what the policy reads: these columns of the row, and rows of these tables. With
--               them, relays remember each user's answer for each combination of those column
--               values and ask the database again only after a change to one of policy_tables
--               (or after a minute). Every table in policy_tables must be watched too; until it
--               is, answers are not remembered. A policy that reads anything else (another
--               table, the clock, a setting) must not declare them: leave policy_columns NULL and
--               every change is judged afresh. Example: ARRAY['project_id', 'is_private',
--               'assignee_id', 'created_by'] and ARRAY['project_members'] for the task policy.
--   max_event_bytes
--               an event whose row (with its old values) is larger than this, as JSON, is
--               delivered with just the primary key columns in `row`, no `old`, and
--               "truncated": true, so clients refetch it. Default 1 MiB. The relay can deliver
--               rows of up to 16 MiB whole (raise this for that); the policy always sees the
--               whole row.
--
-- Calling it again replaces the table's settings. Creating the triggers takes a brief lock on the
-- table, like any CREATE TRIGGER; calling it again with the triggers in place takes none.
-- (Upgrades: the signature before policy_columns/policy_tables, which would make calls ambiguous.)
DROP FUNCTION IF EXISTS pgrelay.watch(regclass, text[], regproc, text, text[], text[], boolean, regproc);
-- (And the signature before max_event_bytes.)
DROP FUNCTION IF EXISTS pgrelay.watch(regclass, text[], regproc, text, text[], text[], boolean, regproc, text[], regclass[]);
CREATE OR REPLACE FUNCTION pgrelay.watch(
    tbl        regclass,
    rooms      text[],
    policy     regproc DEFAULT NULL,
    entity     text    DEFAULT NULL,
    exclude    text[]  DEFAULT '{}',
    include    text[]  DEFAULT NULL,
    old_values boolean DEFAULT true,
    room_fn    regproc DEFAULT NULL,
    policy_columns text[]     DEFAULT NULL,
    policy_tables  regclass[] DEFAULT '{}',
    max_event_bytes int       DEFAULT 1048576
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    rel        pg_class;
    nsp        text;
    shown_name text;
    hidden     text[];
    fn         regprocedure;
    missing    text[];
    unkeyed    text[];
BEGIN
    SELECT * INTO rel FROM pg_class WHERE oid = tbl;
    nsp := rel.relnamespace::regnamespace::text;
    shown_name := CASE WHEN nsp = 'public' THEN rel.relname ELSE nsp || '.' || rel.relname END;
    IF policy IS NOT NULL THEN
        fn := pgrelay.check_policy(policy, 'jsonb');
    ELSE
        RAISE NOTICE 'pgrelay: % has no read policy, so nobody will receive its changes', shown_name;
    END IF;
    IF coalesce(array_length(rooms, 1), 0) = 0 AND room_fn IS NULL THEN
        RAISE EXCEPTION 'pgrelay.watch(%): give room templates, a room function, or both', shown_name;
    END IF;
    IF room_fn IS NOT NULL AND NOT EXISTS (
        SELECT FROM pg_proc p WHERE p.oid = room_fn AND p.pronargs = 1
           AND p.proargtypes[0] = 'jsonb'::regtype AND p.prorettype = 'text[]'::regtype) THEN
        RAISE EXCEPTION 'room function % must be declared as %(row jsonb) RETURNS text[]', room_fn, room_fn;
    END IF;
    -- Validate the templates now rather than at the first write.
    PERFORM pgrelay.room_expression(tbl, t, 'n') FROM unnest(rooms) AS t;
    IF policy_columns IS NOT NULL THEN
        IF policy IS NULL THEN
            RAISE EXCEPTION 'pgrelay.watch(%): policy_columns describe a policy; give the policy too', shown_name;
        END IF;
        SELECT array_agg(c) INTO missing FROM unnest(policy_columns) AS c
        WHERE NOT EXISTS (SELECT FROM pg_attribute
                          WHERE attrelid = tbl AND attname = c AND attnum > 0 AND NOT attisdropped);
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'pgrelay.watch(%): policy_columns name %, which the table does not have', shown_name, missing;
        END IF;
        SELECT array_agg(attname ORDER BY attnum) INTO unkeyed FROM pg_attribute
        WHERE attrelid = tbl AND attnum > 0 AND NOT attisdropped AND attname <> ALL (policy_columns);
        unkeyed := coalesce(unkeyed, '{}');
        IF EXISTS (SELECT FROM unnest(policy_tables) AS d(t)
                   WHERE NOT EXISTS (SELECT FROM pgrelay.watches AS x WHERE x.tbl = d.t)
                     AND d.t <> tbl) THEN
            RAISE NOTICE 'pgrelay: % answers are remembered only once all of % are watched', shown_name, policy_tables;
        END IF;
    END IF;

    -- Columns left out of payloads: the excluded ones; with `include`, also every column not in
    -- it, including columns added later (decided when the change is read).
    hidden := coalesce(exclude, '{}');

    IF max_event_bytes IS NULL OR max_event_bytes <= 0 THEN
        RAISE EXCEPTION 'pgrelay.watch(%): max_event_bytes must be a positive number of bytes', shown_name;
    END IF;

    INSERT INTO pgrelay.watches AS w (tbl, name, entity, rooms, policy, exclude, old_values, room_fn,
                                      include, policy_columns, policy_tables, unkeyed, max_event_bytes)
    VALUES (tbl, shown_name, coalesce(entity, regexp_replace(rel.relname, 's$', '')),
            coalesce(rooms, '{}'), fn, hidden, old_values, room_fn::oid::regprocedure, watch.include,
            watch.policy_columns, coalesce(watch.policy_tables, '{}'), unkeyed, watch.max_event_bytes)
    ON CONFLICT ON CONSTRAINT watches_pkey DO UPDATE
        SET name = excluded.name, entity = excluded.entity, rooms = excluded.rooms,
            policy = excluded.policy, exclude = excluded.exclude, old_values = excluded.old_values,
            room_fn = excluded.room_fn, include = excluded.include,
            policy_columns = excluded.policy_columns, policy_tables = excluded.policy_tables,
            unkeyed = excluded.unkeyed, max_event_bytes = excluded.max_event_bytes;

    PERFORM pgrelay.install_capture(tbl);
    PERFORM pgrelay.rebuild_dispatch();
END $$;

-- Waking relays
-- -------------
--
-- A transaction that sent NOTIFY takes a cluster-wide lock just before it commits and keeps it
-- until its commit is flushed to disk, so notifying writers commit one at a time instead of
-- sharing WAL flushes (group commit). Yet a NOTIFY only helps a relay that is waiting for one: a
-- relay busy reading batch after batch finds new changes by itself. So relays say when they
-- sleep, and writers notify only then. Two advisory locks, in the two-key form (first key
-- 1885827692, the bytes 'pgrl'; two-key locks never collide with the one-key bigint locks, and an
-- application using two-key locks must not use this first key):
--
--   (1885827692, 1)  "sleeping": every relay waiting for a NOTIFY holds it in SHARE mode on its
--                    LISTEN connection (a relay that crashes or disconnects releases it).
--   (1885827692, 2)  "writing": a transaction that decided not to notify holds it in SHARE mode
--                    until it ends.
--
-- A capture function, after a statement that captured rows, notifies when it cannot take
-- "writing" (a relay is going to sleep right now) or when it cannot take "sleeping" exclusively
-- for an instant (a relay sleeps). Otherwise it holds "writing" and does not notify.
-- A relay that found nothing new takes "sleeping", then takes "writing" exclusively and releases
-- it at once (this waits for every transaction that decided not to notify, and while it waits
-- every new writer notifies), reads once more, and waits for a NOTIFY. Woken, it releases
-- "sleeping" and reads until it finds nothing again.
--
-- Why nothing is missed: a writer that did not notify took "writing" before it found "sleeping"
-- free, so a relay that sleeps took "sleeping" after that, and its exclusive "writing" waited for
-- the writer's commit (Postgres releases locks after the commit is visible): its last read saw
-- the writer's changes. Every later writer notifies. The full argument, with savepoints, isolation
-- levels and lost connections, is in the relay's source (src/capture/wakeup.rs).
--
-- What writers pay: three lock-table operations per captured statement; a NOTIFY (and the commit
-- lock) only while some relay sleeps, that is when writes are rare and the lock costs nothing.
-- `SELECT * FROM pg_locks WHERE locktype = 'advisory' AND classid = 1885827692` shows them:
-- objid 1 are sleeping relays, objid 2 writers that did not notify.

-- Invalidations
-- -------------
--
-- Relays remember policy answers and re-check room access when a change says that access may have
-- changed (see pgrelay.read_batch(): flush, recheck). Two things change access without a row
-- change: a TRUNCATE of a watched table, and a policy function replaced in place (CREATE OR
-- REPLACE keeps its OID, so nothing else tells). Both record an *invalidation*: an outbox row with
-- op 'TRUNCATE' or 'INVALIDATE' and no rooms. It is read in commit order like every change, and a
-- relay that reads it forgets every remembered answer before judging anything committed after it,
-- and asks the join policies again for every member of every room. It is delivered to nobody.
-- What neither can show (triggers disabled, session_replication_role = replica, a function the
-- policy calls replaced without the event trigger) is caught by the relays' periodic re-check.

-- The TRUNCATE trigger of every watched table (statement-level, AFTER TRUNCATE; installed by
-- pgrelay.watch()). SECURITY DEFINER like the capture functions: whoever may truncate the table
-- records the invalidation without any right on schema pgrelay.
CREATE OR REPLACE FUNCTION pgrelay.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO pgrelay.changes (tbl, entity, op, rooms, "row")
    SELECT w.name, w.entity, 'TRUNCATE', '{}', '{}' FROM pgrelay.watches AS w WHERE w.tbl = TG_RELID;
    -- Rare: always wake sleeping relays (the capture functions' lock dance saves commit-time
    -- NOTIFYs for frequent writes, which this is not).
    PERFORM pg_notify('pgrelay', '');
    RETURN NULL;
END $$;
COMMENT ON FUNCTION pgrelay.capture_truncate() IS
    'pgrelay: TRUNCATE of a watched table; records an invalidation so relays forget remembered answers';
REVOKE ALL ON FUNCTION pgrelay.capture_truncate() FROM PUBLIC;

-- The event trigger pgrelay_function_changed (installed below when the installing role is a
-- superuser, which event triggers require): a CREATE FUNCTION or ALTER FUNCTION of any function
-- outside schema pgrelay records an invalidation. Any function, not only registered policies:
-- policies call helpers (the example's project_role()), and replacing a helper changes answers as
-- much. Function DDL is rare (migrations), and an invalidation costs the relays one fresh policy
-- evaluation per (user, kind of row) and one join check per membership.
CREATE OR REPLACE FUNCTION pgrelay.function_changed() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    fn record;
    recorded boolean := false;
BEGIN
    FOR fn IN SELECT c.object_identity FROM pg_event_trigger_ddl_commands() AS c
              WHERE c.classid = 'pg_catalog.pg_proc'::regclass
                AND c.schema_name IS DISTINCT FROM 'pgrelay' LOOP
        INSERT INTO pgrelay.changes (tbl, entity, op, rooms, "row")
        VALUES (fn.object_identity, '', 'INVALIDATE', '{}', '{}');
        recorded := true;
    END LOOP;
    IF recorded THEN
        PERFORM pg_notify('pgrelay', '');
    END IF;
END $$;
COMMENT ON FUNCTION pgrelay.function_changed() IS
    'pgrelay: a function was created or altered; records an invalidation (event trigger pgrelay_function_changed)';
REVOKE ALL ON FUNCTION pgrelay.function_changed() FROM PUBLIC;

-- Generates the table's capture function from its pgrelay.watches row and makes sure its three
-- triggers exist. The function runs static, pre-planned SQL: one INSERT ... SELECT per statement,
-- whatever the number of rows. It runs with the rights of whoever called watch() (SECURITY
-- DEFINER), so application roles need no privileges on schema pgrelay and cannot forge changes.
-- Read it with \sf pgrelay.capture_<table oid>.
CREATE OR REPLACE FUNCTION pgrelay.install_capture(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w         pgrelay.watches;
    fn_name   text := 'capture_' || tbl::oid;
    pk        text;
    pk_join   text;
    rooms_n   text;
    rooms_o   text;
    rooms_u   text;
    rooms_changed text;
    distinct_rooms boolean;
    hide      text;
    old_expr  text;
    body      text;
    op        text;
BEGIN
    SELECT * INTO w FROM pgrelay.watches AS x WHERE x.tbl = install_capture.tbl;

    -- Rows of an UPDATE are paired old-with-new by primary key. A row whose key changed has no
    -- partner: it is recorded as the old row deleted and the new row created.
    SELECT string_agg(format('n.%1$I = o.%1$I', a.attname), ' AND '), min(format('%I', a.attname))
      INTO pk_join, pk
    FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
    WHERE i.indrelid = tbl AND i.indisprimary;
    IF pk_join IS NULL THEN
        RAISE EXCEPTION 'pgrelay.watch(%): the table needs a primary key', w.name;
    END IF;
    -- What a truncated event keeps (see watches.max_event_bytes). Set here, which every install
    -- runs for every watched table, so upgraded installs and changed keys get it too.
    UPDATE pgrelay.watches AS x
       SET key_columns = (SELECT array_agg(a.attname::text ORDER BY k.ord)
                          FROM pg_index i
                          CROSS JOIN unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                          WHERE i.indrelid = install_capture.tbl AND i.indisprimary)
     WHERE x.tbl = install_capture.tbl;

    -- Rooms, as text[] expressions over the new row n, the old row o, or both (UPDATE). The
    -- templates' rooms plus the room function's answer, NULLs dropped, each room once. This runs
    -- for every captured row, so it is plain expressions (no function call, no subquery) when
    -- the templates cannot produce the same room twice: each starts with its own text, none the
    -- beginning of another ('project:' and 'task:'), and there is no room function. Then only
    -- an UPDATE's old and new room of the same template can be equal, and the old one is added
    -- only when it differs.
    SELECT bool_and(split_part(t, '{', 1) <> '') AND w.room_fn IS NULL
           AND NOT EXISTS (SELECT FROM unnest(w.rooms) AS a, unnest(w.rooms) AS b
                           WHERE a <> b AND starts_with(split_part(a, '{', 1), split_part(b, '{', 1)))
           AND count(*) = count(DISTINCT t)
      INTO distinct_rooms FROM unnest(w.rooms) AS t;
    SELECT coalesce(string_agg(pgrelay.room_expression(tbl, t, 'n'), ', '), ''),
           coalesce(string_agg(pgrelay.room_expression(tbl, t, 'o'), ', '), ''),
           coalesce(string_agg(format('CASE WHEN %1$s IS DISTINCT FROM %2$s THEN %1$s END',
                                      pgrelay.room_expression(tbl, t, 'o'),
                                      pgrelay.room_expression(tbl, t, 'n')), ', '), '')
      INTO rooms_n, rooms_o, rooms_changed FROM unnest(w.rooms) AS t;
    IF coalesce(distinct_rooms, true) THEN
        rooms_u := format('array_remove(ARRAY[%s]::text[], NULL)', concat_ws(', ', nullif(rooms_n, ''), nullif(rooms_changed, '')));
        rooms_n := format('array_remove(ARRAY[%s]::text[], NULL)', rooms_n);
        rooms_o := format('array_remove(ARRAY[%s]::text[], NULL)', rooms_o);
    ELSE
        rooms_n := format('ARRAY[%s]::text[]', rooms_n);
        rooms_o := format('ARRAY[%s]::text[]', rooms_o);
        IF w.room_fn IS NOT NULL THEN
            rooms_n := format('%s || CASE WHEN n.%s IS NOT NULL THEN %s(to_jsonb(n.*)) END', rooms_n, pk,
                              pgrelay.qualified(w.room_fn));
            rooms_o := format('%s || CASE WHEN o.%s IS NOT NULL THEN %s(to_jsonb(o.*)) END', rooms_o, pk,
                              pgrelay.qualified(w.room_fn));
        END IF;
        rooms_u := format('ARRAY(SELECT DISTINCT r FROM unnest(%s || %s) AS r WHERE r IS NOT NULL ORDER BY r)',
                          rooms_n, rooms_o);
        rooms_n := format('ARRAY(SELECT DISTINCT r FROM unnest(%s) AS r WHERE r IS NOT NULL ORDER BY r)', rooms_n);
        rooms_o := format('ARRAY(SELECT DISTINCT r FROM unnest(%s) AS r WHERE r IS NOT NULL ORDER BY r)', rooms_o);
    END IF;
    hide := CASE WHEN w.exclude = '{}' THEN 'NULL' ELSE format('%L::text[]', w.exclude) END
            || ', ' || CASE WHEN w.include IS NULL THEN 'NULL' ELSE format('%L::text[]', w.include) END;
    -- An UPDATE records the whole old row; pgrelay.changes_between() reduces it to the changed
    -- columns when the change is read. Comparing column by column here cost the writer more
    -- than everything else the capture does. (Typed: a bare NULL would be text, which the jsonb
    -- column refuses.)
    old_expr := CASE WHEN w.old_values
                     THEN format('CASE WHEN n.%1$s IS NOT NULL AND o.%1$s IS NOT NULL THEN to_jsonb(o.*) END', pk)
                     ELSE 'NULL::jsonb' END;

    body := format($f$
DECLARE
    captured bigint;
BEGIN
    -- Generated by pgrelay.watch(); call pgrelay.watch() again to change it.
    -- (Each INSERT's gen is the column's default: the current generation.)
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pgrelay.changes (tbl, entity, op, rooms, "row", hide, show)
        SELECT %1$L, %2$L, 'INSERT', %3$s, to_jsonb(n.*), %5$s
        FROM new_rows AS n;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Old and new rows paired by primary key; a row whose key changed has no partner (the
        -- other side is all NULL) and is recorded as a deletion and a creation. Rows that did not
        -- change are not recorded: *<> compares the two rows byte for byte, which works for every
        -- column type (json and point have no = operator).
        -- Each row is converted to jsonb once. (Naming the conversions in a LATERAL subquery does
        -- not do that: the planner flattens it and repeats them at every use, six per row.)
        INSERT INTO pgrelay.changes (tbl, entity, op, rooms, "row", old, hide, show)
        SELECT %1$L, %2$L,
               CASE WHEN o.%7$s IS NULL THEN 'INSERT' WHEN n.%7$s IS NULL THEN 'DELETE' ELSE 'UPDATE' END,
               %10$s,
               CASE WHEN n.%7$s IS NULL THEN to_jsonb(o.*) ELSE to_jsonb(n.*) END,
               %6$s,
               %5$s
        FROM new_rows AS n
        FULL JOIN old_rows AS o ON %8$s
        WHERE n.%7$s IS NULL OR o.%7$s IS NULL OR n.* OPERATOR(pg_catalog.*<>) o.*;
    ELSE
        INSERT INTO pgrelay.changes (tbl, entity, op, rooms, "row", hide, show)
        SELECT %1$L, %2$L, 'DELETE', %4$s, to_jsonb(o.*), %5$s
        FROM old_rows AS o;
    END IF;

    GET DIAGNOSTICS captured = ROW_COUNT;
    -- Wake relays that sleep, and only them (see "Waking relays" in sql/pgrelay.sql). A wake-up,
    -- not the record: one per transaction at most (Postgres folds duplicates).
    IF captured > 0 AND (CASE
        -- A relay is going to sleep right now and waits for writers like us: notify.
        WHEN NOT pg_try_advisory_xact_lock_shared(1885827692, 2) THEN true
        -- From here on we hold (pgrl, 2) until we end, so a relay that goes to sleep later waits
        -- for our commit and then reads our changes. A relay that sleeps already holds (pgrl, 1):
        -- taking it exclusively fails, and we notify. (Lock and unlock are one expression: no
        -- interrupt can come between them and leave the lock taken.)
        WHEN NOT pg_try_advisory_lock(1885827692, 1) THEN true
        ELSE NOT pg_advisory_unlock(1885827692, 1)
    END) THEN
        PERFORM pg_notify('pgrelay', '');
    END IF;
    RETURN NULL;
END
$f$, w.name, w.entity, rooms_n, rooms_o, hide, old_expr, pk, pk_join, NULL, rooms_u);

    EXECUTE format('CREATE OR REPLACE FUNCTION pgrelay.%I() RETURNS trigger LANGUAGE plpgsql '
                   'SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS %L', fn_name, body);
    EXECUTE format('COMMENT ON FUNCTION pgrelay.%I() IS %L', fn_name,
                   'pgrelay capture of ' || w.name || ', generated by pgrelay.watch()');
    EXECUTE format('REVOKE ALL ON FUNCTION pgrelay.%I() FROM PUBLIC', fn_name);

    -- Statement-level triggers with transition tables: one invocation per statement.
    FOREACH op IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
        IF NOT EXISTS (SELECT FROM pg_trigger
                       WHERE tgrelid = tbl AND tgname = 'pgrelay_capture_' || op
                         AND tgfoid = format('pgrelay.%I()', fn_name)::regprocedure) THEN
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'pgrelay_capture_' || op, tbl);
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s FOR EACH STATEMENT '
                           'EXECUTE FUNCTION pgrelay.%I()',
                           'pgrelay_capture_' || op, upper(op), tbl,
                           CASE op WHEN 'insert' THEN 'NEW TABLE AS new_rows'
                                   WHEN 'update' THEN 'OLD TABLE AS old_rows NEW TABLE AS new_rows'
                                   ELSE 'OLD TABLE AS old_rows' END,
                           fn_name);
        END IF;
    END LOOP;
    -- A TRUNCATE records an invalidation (see "Invalidations").
    IF NOT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = tbl AND tgname = 'pgrelay_capture_truncate') THEN
        EXECUTE format('CREATE TRIGGER pgrelay_capture_truncate AFTER TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION pgrelay.capture_truncate()', tbl);
    END IF;
END $$;

-- Stop capturing a table's changes. Changes already in the outbox are still delivered.
CREATE OR REPLACE FUNCTION pgrelay.unwatch(tbl regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM pgrelay.watches w WHERE w.tbl = unwatch.tbl;
    EXECUTE format('DROP TRIGGER IF EXISTS pgrelay_capture_insert ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgrelay_capture_update ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgrelay_capture_delete ON %s', tbl);
    EXECUTE format('DROP TRIGGER IF EXISTS pgrelay_capture_truncate ON %s', tbl);
    EXECUTE format('DROP FUNCTION IF EXISTS pgrelay.%I()', 'capture_' || tbl::oid);
    PERFORM pgrelay.rebuild_dispatch();
END $$;

-- Helpers used by the generated capture functions.

-- Earlier versions called this from the capture functions; they now inline it.
DROP FUNCTION IF EXISTS pgrelay.room_list(text[]);


-- ---------------------------------------------------------------------------------------------
-- Relays: who reads the outbox, and how far behind they are
-- ---------------------------------------------------------------------------------------------

-- Each relay reports here every few seconds (its own row only: relays never wait for each other).
CREATE TABLE IF NOT EXISTS pgrelay.relays (
    name        text PRIMARY KEY,          -- host:pid
    started_at  timestamptz NOT NULL,
    seen_at     timestamptz NOT NULL,      -- last report
    position    text NOT NULL,             -- snapshot: every change visible in it is delivered
    connections int NOT NULL
);

-- Backlog (changes committed but not yet delivered) and lag (age of the oldest of them) per relay.
-- A relay not seen for a minute is probably gone; maintain() forgets it after a day.
CREATE OR REPLACE VIEW pgrelay.lag AS
SELECT r.name,
       r.seen_at > now() - interval '1 minute' AS alive,
       r.connections,
       b.backlog,
       coalesce(now() - b.oldest, interval '0') AS lag,
       r.seen_at,
       r.started_at
FROM pgrelay.relays AS r
CROSS JOIN LATERAL (
    SELECT count(*) AS backlog, min(c.ts) AS oldest
    FROM pgrelay.changes_between(r.position::pg_snapshot, pg_current_snapshot()) AS c
) AS b;
COMMENT ON VIEW pgrelay.lag IS 'Per relay: changes committed but not yet delivered, and how old the oldest is';

-- ---------------------------------------------------------------------------------------------
-- Retention
-- ---------------------------------------------------------------------------------------------

-- One step of retention; cheap, safe to call often and from several relays at once (only one does
-- the work). Returns what it did: 'idle', 'busy', 'rotated', 'emptied N' or 'emptied N rotated'.
--
-- Why the sequence: a writer reads the generation in the same statement that writes its change,
-- after its transaction id was assigned. So once nextval() has returned, every transaction that
-- can still write into the old generation has an id below a snapshot taken now (sealed_xmax);
-- when the oldest running transaction is past that id, the old generation is complete.
CREATE OR REPLACE FUNCTION pgrelay.maintain() RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    current smallint;
    keep    interval;
    g       pgrelay.generations;
    did     text := 'idle';
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('pgrelay.maintain')) THEN
        RETURN 'busy';
    END IF;
    SELECT r.keep INTO keep FROM pgrelay.retention AS r;
    current := (SELECT last_value % 3 FROM pgrelay.generation);

    -- Repair after an interrupted rotation: the sequence is the truth.
    IF (SELECT state FROM pgrelay.generations WHERE gen = current) <> 'current' THEN
        UPDATE pgrelay.generations
           SET state = 'sealed', since = now(), complete_at = NULL,
               sealed_xmax = pg_snapshot_xmax(pg_current_snapshot())
         WHERE state = 'current';
        UPDATE pgrelay.generations SET state = 'current', since = now() WHERE gen = current;
    END IF;

    -- Sealed generations whose writers have all ended are complete.
    UPDATE pgrelay.generations
       SET complete_at = now()
     WHERE state = 'sealed' AND complete_at IS NULL
       AND pg_snapshot_xmin(pg_current_snapshot()) >= sealed_xmax;

    -- Empty the generation after the current one (the next to be used) once it is `keep` past
    -- completion, ... (a relay silent for 5 minutes no longer holds it back). The TRUNCATE waits
    -- at most 50 ms for readers, or is left for the next call.
    SELECT * INTO g FROM pgrelay.generations WHERE gen = (current + 1) % 3;
    -- ... and once every live relay has read past it.
    IF g.state = 'sealed' AND g.complete_at + keep <= now()
       AND NOT EXISTS (SELECT FROM pgrelay.relays AS r
                       WHERE r.seen_at > now() - interval '5 minutes'
                         AND pg_snapshot_xmin(r.position::pg_snapshot) < g.sealed_xmax) THEN
        BEGIN
            SET LOCAL lock_timeout = '50ms';
            EXECUTE format('TRUNCATE pgrelay.changes_%s', g.gen);
            UPDATE pgrelay.retention SET horizon = greatest(horizon, g.sealed_xmax);
            UPDATE pgrelay.generations
               SET state = 'empty', since = now(), sealed_xmax = NULL, complete_at = NULL
             WHERE gen = g.gen;
            g.state := 'empty';
            did := 'emptied ' || g.gen || ' ';
        EXCEPTION WHEN lock_not_available THEN
            RETURN 'busy';
        END;
    END IF;

    -- Forget relays that stopped reporting a day ago.
    DELETE FROM pgrelay.relays WHERE seen_at < now() - interval '1 day';

    -- Move on once the current generation is `keep` old and the next one is empty.
    IF g.state = 'empty'
       AND (SELECT since FROM pgrelay.generations WHERE gen = current) + keep <= now() THEN
        UPDATE pgrelay.generations SET state = 'current', since = now() WHERE gen = g.gen;
        PERFORM nextval('pgrelay.generation');
        UPDATE pgrelay.generations
           SET state = 'sealed', since = now(), sealed_xmax = pg_snapshot_xmax(pg_current_snapshot())
         WHERE gen = current;
        did := replace(did, 'idle', '') || 'rotated';
    END IF;
    RETURN trim(did);
END $$;
COMMENT ON FUNCTION pgrelay.maintain() IS 'Rotates and empties outbox generations per pgrelay.retention.keep; the relay calls it';

-- Whether a client that has seen everything in snapshot `seen` can still be given all it missed:
-- nothing it has not seen was removed, and the snapshot is not from the future (or another database).
CREATE OR REPLACE FUNCTION pgrelay.resumable(seen pg_snapshot) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pg_snapshot_xmin(seen) >= (SELECT horizon FROM pgrelay.retention)
       AND pg_snapshot_xmax(seen) <= pg_snapshot_xmax(pg_current_snapshot())
$$;

-- ---------------------------------------------------------------------------------------------
-- Finish the install
-- ---------------------------------------------------------------------------------------------

-- Regenerate every capture function, so an upgraded library takes effect on tables watched before.
DO $$
DECLARE
    t regclass;
BEGIN
    FOR t IN SELECT tbl FROM pgrelay.watches LOOP
        PERFORM pgrelay.install_capture(t);
    END LOOP;
END $$;

SELECT pgrelay.rebuild_dispatch();

-- The event trigger for replaced functions (see "Invalidations"). Only a superuser may create event
-- triggers; without one, a replaced policy takes effect when the relays' remembered answers expire
-- (a minute at most) and their periodic re-check of room access (PGRELAY_RECHECK_INTERVAL).
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'pgrelay_function_changed') THEN
        RETURN;
    ELSIF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        CREATE EVENT TRIGGER pgrelay_function_changed ON ddl_command_end
            WHEN TAG IN ('CREATE FUNCTION', 'ALTER FUNCTION')
            EXECUTE FUNCTION pgrelay.function_changed();
    ELSE
        RAISE NOTICE 'pgrelay: not a superuser, so no event trigger: a replaced policy function takes effect within a minute (see docs/dba.md, Invalidations)';
    END IF;
END $$;

-- Nothing in pgrelay is for application roles: the capture triggers write with their owner's
-- rights. Grant the relay's role what it needs (see docs/dba.md); nobody else gets anything.
REVOKE ALL ON SCHEMA pgrelay FROM PUBLIC;
