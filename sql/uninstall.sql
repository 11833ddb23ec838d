-- pgrelay uninstall: removes the capture triggers from every watched table, then the schema
-- pgrelay with the outbox and all configuration. Safe to run again (does nothing the second time).
-- Your own policy and room functions, in your schemas, are left alone.

DO $$
DECLARE
    t regclass;
BEGIN
    IF to_regclass('pgrelay.watches') IS NOT NULL THEN
        FOR t IN SELECT tbl FROM pgrelay.watches LOOP
            PERFORM pgrelay.unwatch(t);
        END LOOP;
    END IF;
END $$;

DROP EVENT TRIGGER IF EXISTS pgrelay_function_changed;
DROP SCHEMA IF EXISTS pgrelay CASCADE;
