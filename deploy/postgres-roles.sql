-- Least-privilege PostgreSQL roles for seedance-archiver.
--
-- Run it in the archive's database, after `seedance-archiver migrate`, as the database owner or a
-- superuser (creating roles needs CREATEROLE):
--
--     psql -v ON_ERROR_STOP=1 -d videos -f deploy/postgres-roles.sql
--
-- It is idempotent: run it again after every migration (a new table gets no grant until then).
--
-- Three kinds of role:
--   * the owner of the database and its tables (the role that ran `migrate`). Schema changes are
--     DDL, so only the owner migrates: by hand or from a deploy step with the owner's URL, e.g.
--       SEEDANCE_DATABASE_URL=postgresql://videos_owner@db/videos seedance-archiver migrate
--   * seedance_archiver: what the daemon (`run`) and the operator commands (`add`, `status`,
--     `list`, `retry`, `check`, `webhooks`) need: the rows of video_tasks (DELETE for
--     SEEDANCE_PRUNE_AFTER_DAYS), of archiver_heartbeats and of webhook_outbox. It may read alembic_version, so
--     `seedance-archiver migrate` run as this role (the ExecStartPre of
--     deploy/seedance-archiver.service) is a no-op at head and fails -- the daemon does not
--     start -- when the database is behind the code.
--   * seedance_feeder: what the applications that feed task ids need: INSERT (task_id, mode,
--     provider) and SELECT on video_tasks, nothing else (DESIGN.md's feeding contract; provider
--     routes a row to one provider's daemon when two share the table).
--
-- Both are NOLOGIN group roles; the roles that log in are their members, with passwords you choose:
--
--     CREATE ROLE archiver LOGIN PASSWORD 'change-me' IN ROLE seedance_archiver;
--     CREATE ROLE video_app LOGIN PASSWORD 'change-me' IN ROLE seedance_feeder;
--
-- LISTEN needs no privilege. An INSERT fires the statement trigger video_tasks_notify, a plain
-- (SECURITY INVOKER) function calling pg_notify(). PostgreSQL checks EXECUTE on a trigger function
-- only when the trigger is created (by the owner), not when it fires; pg_notify() itself is checked
-- as the inserting role, and PUBLIC may execute it by default. Keep it that way: where EXECUTE on
-- pg_notify(text, text) has been revoked from PUBLIC, every insert fails with "permission denied
-- for function pg_notify" (only a superuser can grant it back).
--
-- A move into a terminal state fires the row trigger video_tasks_done (migration 0006), also
-- SECURITY INVOKER with a pinned search_path: it inserts the webhook event into webhook_outbox and
-- sends NOTIFY video_tasks_done as the updating role, so the daemon's role needs INSERT on the
-- outbox and USAGE on its id sequence. The feeder never changes a state, so it needs neither.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'seedance_feeder') THEN
        CREATE ROLE seedance_feeder NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'seedance_archiver') THEN
        CREATE ROLE seedance_archiver NOLOGIN;
    END IF;
END
$$;

-- CONNECT is PUBLIC's by default; granting it keeps both roles working where that was revoked.
DO $$
BEGIN
    EXECUTE format(
        'GRANT CONNECT ON DATABASE %I TO seedance_feeder, seedance_archiver',
        current_database()
    );
END
$$;

-- Nobody but the owner creates objects in public (PostgreSQL 15 does this by default; older
-- databases, and those upgraded from them, still let every role create tables and functions there,
-- which could shadow names others resolve through the search path).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO seedance_feeder, seedance_archiver;

-- Start from nothing on each object, so a re-run also takes back anything granted by hand since.
REVOKE ALL ON TABLE video_tasks FROM seedance_feeder, seedance_archiver;
REVOKE ALL ON TABLE archiver_heartbeats FROM seedance_feeder, seedance_archiver;
REVOKE ALL ON TABLE alembic_version FROM seedance_feeder, seedance_archiver;
REVOKE ALL ON TABLE webhook_outbox FROM seedance_feeder, seedance_archiver;
REVOKE ALL ON SEQUENCE webhook_outbox_id_seq FROM seedance_feeder, seedance_archiver;
REVOKE ALL ON TABLE task_history FROM seedance_feeder, seedance_archiver;
REVOKE ALL ON SEQUENCE task_history_id_seq FROM seedance_feeder, seedance_archiver;

-- The feeder: read every column, insert a task id and its mode; every other column is the daemon's.
GRANT SELECT ON TABLE video_tasks TO seedance_feeder;
GRANT INSERT (task_id, mode, provider) ON TABLE video_tasks TO seedance_feeder;

-- The daemon: claim, lease and record outcomes (UPDATE), `add` (INSERT), prune (DELETE); its
-- heartbeat row is inserted, updated every few seconds and deleted on a clean stop.
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE video_tasks TO seedance_archiver;
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE archiver_heartbeats TO seedance_archiver;
GRANT SELECT ON TABLE alembic_version TO seedance_archiver;
-- The outbox: written by the trigger (INSERT), claimed and recorded (UPDATE), pruned (DELETE).
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE webhook_outbox TO seedance_archiver;
GRANT USAGE ON SEQUENCE webhook_outbox_id_seq TO seedance_archiver;
-- Webhook URLs a 410 Gone paused: written on the 410 (INSERT), deleted by `webhooks resume`.
GRANT SELECT, INSERT, DELETE ON TABLE webhook_endpoints TO seedance_archiver;
-- Each row's moves: written by a trigger on each change the daemon makes (INSERT), deleted with
-- the row (DELETE), read by the task page.
GRANT SELECT, INSERT, DELETE ON TABLE task_history TO seedance_archiver;
GRANT USAGE ON SEQUENCE task_history_id_seq TO seedance_archiver;

-- No statement of the daemon's role runs away: the daemon sets its own statement_timeout on every
-- connection (SEEDANCE_DATABASE_STATEMENT_TIMEOUT_SECONDS); this is the backstop for anything else
-- that logs in as it (psql, a script). Role settings apply to the role that logs in and are not
-- inherited from a group, so they are set on seedance_archiver and on each login member it has now:
-- run this file again after adding a member.
ALTER ROLE seedance_archiver SET statement_timeout = '30s';
DO $$
DECLARE
    member name;
BEGIN
    FOR member IN
        SELECT r.rolname FROM pg_catalog.pg_auth_members m
        JOIN pg_catalog.pg_roles r ON r.oid = m.member
        JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
        WHERE g.rolname = 'seedance_archiver' AND r.rolcanlogin
    LOOP
        EXECUTE format('ALTER ROLE %I SET statement_timeout = %L', member, '30s');
    END LOOP;
END
$$;
