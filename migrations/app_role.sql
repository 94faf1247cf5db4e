-- An application role for Lethe on PostgreSQL that may only INSERT into (and read) the audit
-- log: run as the schema owner after `lethe migrate`, then point LETHE_DATABASE_URL of the
-- api and worker at lethe_app (migrations keep running as the owner).
-- psql -v app_role=lethe_app -v app_password="'...'" -f migrations/app_role.sql
CREATE ROLE :app_role LOGIN PASSWORD :app_password;
GRANT USAGE ON SCHEMA public TO :app_role;
-- Every table but the audit log: ordinary read/write.
GRANT SELECT, INSERT, UPDATE, DELETE ON
    api_keys, datasets, records, models, model_versions, deletion_requests, jobs, counters
    TO :app_role;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :app_role;
-- The audit log: append and read, never rewrite or remove.
GRANT SELECT, INSERT ON audit_events TO :app_role;
REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM :app_role;
-- The single head row is moved on each append (it serialises writers); it cannot be
-- inserted or deleted. Rewinding it is what the signed checkpoints detect.
GRANT SELECT, UPDATE ON audit_head TO :app_role;
-- alembic_version: read, so the service can check it runs at the migration head.
GRANT SELECT ON alembic_version TO :app_role;
