use super::Kind::*;
use super::*;

fn wf() -> Vec<String> {
    ["public.my_writer", "audit_log", "Billing.Charge"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn set(name: &str, value: &str) -> Kind {
    Set {
        name: name.into(),
        value: value.into(),
        local: false,
    }
}

fn set_local(name: &str, value: &str) -> Kind {
    Set {
        name: name.into(),
        value: value.into(),
        local: true,
    }
}

fn reset(name: &str) -> Kind {
    Reset {
        name: Some(name.into()),
    }
}

fn pset(name: &str, value: &str) -> Kind {
    PgnearSet {
        name: name.into(),
        value: value.into(),
    }
}

fn pshow(name: &str) -> Kind {
    PgnearShow { name: name.into() }
}

fn begin(read_only: bool) -> Kind {
    Begin { read_only }
}

fn prep(name: &str) -> Kind {
    Prepare { name: name.into() }
}

fn exec(name: &str) -> Kind {
    Execute { name: name.into() }
}

fn dealloc(name: Option<&str>) -> Kind {
    Deallocate {
        name: name.map(Into::into),
    }
}

macro_rules! cases {
    ($($sql:expr => [$($k:expr),* $(,)?];)*) => {
        vec![$(($sql, vec![$($k),*])),*]
    };
}

#[rustfmt::skip]
fn table() -> Vec<(&'static str, Vec<Kind>)> {
    cases! {
        // --- Rails / ActiveRecord
        r#"SELECT "users".* FROM "users" WHERE "users"."id" = $1 LIMIT $2"# => [Read];
        r#"SELECT 1 AS one FROM "users" WHERE "users"."email" = $1 LIMIT $2"# => [Read];
        r#"INSERT INTO "users" ("email", "created_at", "updated_at") VALUES ($1, $2, $3) RETURNING "id""# => [Write];
        r#"UPDATE "users" SET "name" = $1, "updated_at" = $2 WHERE "users"."id" = $3"# => [Write];
        r#"DELETE FROM "users" WHERE "users"."id" = $1"# => [Write];
        r#"SELECT COUNT(*) FROM "posts" WHERE "posts"."user_id" = $1"# => [Read];
        r#"SELECT "posts".* FROM "posts" WHERE "posts"."user_id" = $1 ORDER BY "posts"."created_at" DESC LIMIT $2 OFFSET $3"# => [Read];
        r#"SELECT "users".* FROM "users" WHERE "users"."id" = $1 LIMIT $2 FOR UPDATE"# => [Write];
        r#"SELECT "users".* FROM "users" WHERE "users"."id" = $1 LIMIT $2 FOR UPDATE NOWAIT"# => [Write];
        "SAVEPOINT active_record_1" => [Savepoint];
        "RELEASE SAVEPOINT active_record_1" => [Release];
        "ROLLBACK TO SAVEPOINT active_record_1" => [RollbackTo];
        r#"SELECT "schema_migrations"."version" FROM "schema_migrations" ORDER BY "schema_migrations"."version" ASC"# => [Read];
        "SELECT pg_try_advisory_lock(5142488412212297760)" => [AdvisoryLock];
        "SELECT pg_advisory_unlock(5142488412212297760)" => [Write];
        "SHOW search_path" => [Read];
        "SET client_min_messages TO 'warning'" => [set("client_min_messages", "'warning'")];
        "SET standard_conforming_strings = on" => [set("standard_conforming_strings", "on")];
        "SET intervalstyle = iso_8601" => [set("intervalstyle", "iso_8601")];
        "SET SESSION timezone TO 'UTC'" => [set("timezone", "'UTC'")];
        "SELECT t.oid, t.typname FROM pg_type as t WHERE t.typname IN ('int2', 'int4')" => [Read];
        r#"SELECT a.attname, format_type(a.atttypid, a.atttypmod), pg_get_expr(d.adbin, d.adrelid) FROM pg_attribute a LEFT JOIN pg_attrdef d ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE a.attrelid = '"users"'::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"# => [Read];
        r#"SELECT "users".* FROM "users" WHERE "users"."id" IN ($1, $2, $3)"# => [Read];
        r#"INSERT INTO "schema_migrations" ("version") VALUES ($1) RETURNING "version""# => [Write];
        r#"UPDATE "counters" SET "hits" = COALESCE("hits", 0) + 1 WHERE "counters"."id" = $1"# => [Write];
        r#"SELECT "users"."id" FROM "users" WHERE ("users"."name" ILIKE '%for update%')"# => [Read];
        r#"SELECT "users".* FROM "users" WHERE "users"."update" = $1"# => [Read];
        "SELECT currval('users_id_seq')" => [Read];
        r#"SELECT setval('"users_id_seq"', 42, true)"# => [Write];
        "SELECT nextval('users_id_seq')" => [Write];
        // --- Ecto
        r#"SELECT u0."id", u0."email" FROM "users" AS u0 WHERE (u0."id" = $1)"# => [Read];
        r#"SELECT p0."id", p0."title" FROM "posts" AS p0 WHERE (p0."user_id" = ANY($1))"# => [Read];
        r#"INSERT INTO "users" ("email","inserted_at","updated_at") VALUES ($1,$2,$3) RETURNING "id""# => [Write];
        r#"UPDATE "users" AS u0 SET "name" = $1 WHERE (u0."id" = $2)"# => [Write];
        r#"DELETE FROM "users" AS u0 WHERE (u0."id" = $1)"# => [Write];
        r#"SELECT u0."id" FROM "users" AS u0 WHERE (u0."id" = $1) FOR UPDATE"# => [Write];
        r#"SELECT TRUE FROM "users" AS u0 WHERE (u0."email" = $1) LIMIT 1"# => [Read];
        r#"SELECT count(u0."id") FROM "users" AS u0"# => [Read];
        r#"INSERT INTO "users" AS u0 ("email") VALUES ($1) ON CONFLICT ("email") DO UPDATE SET "email" = EXCLUDED."email" RETURNING "id""# => [Write];
        r#"SELECT s0."id" FROM "sessions" AS s0 INNER JOIN "users" AS u1 ON u1."id" = s0."user_id" WHERE (s0."token" = $1) AND (s0."inserted_at" > $2::timestamp + (-(60)::numeric * interval '1 day'))"# => [Read];
        "begin" => [begin(false)];
        "commit" => [Commit];
        "rollback" => [Rollback];
        "SELECT pg_advisory_xact_lock($1)" => [Write];
        "SELECT pg_advisory_lock($1)" => [AdvisoryLock];
        "SELECT pg_advisory_unlock_all()" => [AdvisoryUnlockAll];
        r#"LOCK TABLE "schema_migrations" IN SHARE UPDATE EXCLUSIVE MODE"# => [Write];
        r#"SELECT s0."version"::bigint FROM "schema_migrations" AS s0"# => [Read];
        r#"SELECT f0."id" FROM "foos" AS f0 WHERE (f0."id" = $1) FOR SHARE"# => [Write];
        r#"SELECT u0."id" FROM "users" AS u0 WHERE (u0."id" = $1) FOR UPDATE SKIP LOCKED"# => [Write];
        // --- Django
        r#"SELECT "auth_user"."id", "auth_user"."password" FROM "auth_user" WHERE "auth_user"."username" = 'bob' LIMIT 21"# => [Read];
        r#"SELECT "auth_user"."id" FROM "auth_user" WHERE "auth_user"."id" = 1 FOR UPDATE"# => [Write];
        r#"SAVEPOINT "s140230_x1""# => [Savepoint];
        r#"RELEASE SAVEPOINT "s140230_x1""# => [Release];
        r#"ROLLBACK TO SAVEPOINT "s140230_x1""# => [RollbackTo];
        r#"SELECT "django_session"."session_key" FROM "django_session" WHERE ("django_session"."expire_date" > '2024-01-01T00:00:00+00:00'::timestamptz AND "django_session"."session_key" = 'abc') LIMIT 21"# => [Read];
        r#"INSERT INTO "django_session" ("session_key", "session_data", "expire_date") VALUES ('k', 'd', '2024-01-01')"# => [Write];
        r#"UPDATE "django_session" SET "session_data" = 'x' WHERE "django_session"."session_key" = 'k'"# => [Write];
        r#"SELECT "auth_user"."id" FROM "auth_user" INNER JOIN "g" ON ("auth_user"."g_id" = "g"."id") FOR UPDATE OF "auth_user""# => [Write];
        r#"SELECT "auth_user"."id" FROM "auth_user" FOR NO KEY UPDATE"# => [Write];
        r#"SELECT "auth_user"."id" FROM "auth_user" FOR KEY SHARE"# => [Write];
        r#"SELECT (1) AS "a" FROM "auth_user" WHERE "auth_user"."username" = 'x' LIMIT 1"# => [Read];
        "SET TIME ZONE 'UTC'" => [set("timezone", "'UTC'")];
        r#"SELECT "django_migrations"."app", "django_migrations"."name" FROM "django_migrations""# => [Read];
        r#"SELECT COUNT(*) AS "__count" FROM "polls_question""# => [Read];
        r#"SELECT DISTINCT ON ("x"."a") "x"."a", "x"."b" FROM "x" ORDER BY "x"."a""# => [Read];
        r#"CREATE TABLE "polls_question" ("id" bigint NOT NULL PRIMARY KEY GENERATED BY DEFAULT AS IDENTITY, "question_text" varchar(200) NOT NULL)"# => [Write];
        r#"ALTER TABLE "polls_choice" ADD CONSTRAINT "fk" FOREIGN KEY ("question_id") REFERENCES "polls_question" ("id") DEFERRABLE INITIALLY DEFERRED"# => [Write];
        "SELECT c.relname, CASE WHEN c.relispartition THEN 'p' WHEN c.relkind IN ('m', 'v') THEN 'v' ELSE 't' END, obj_description(c.oid, 'pg_class') FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('f', 'm', 'p', 'r', 'v') AND n.nspname NOT IN ('pg_catalog', 'pg_toast') AND pg_catalog.pg_table_is_visible(c.oid)" => [Read];
        // --- Prisma
        r#"SELECT "public"."User"."id", "public"."User"."email" FROM "public"."User" WHERE ("public"."User"."id" = $1 AND 1=1) LIMIT $2 OFFSET $3"# => [Read];
        r#"INSERT INTO "public"."User" ("email","name") VALUES ($1,$2) RETURNING "public"."User"."id""# => [Write];
        r#"UPDATE "public"."User" SET "name" = $1 WHERE ("public"."User"."id" = $2 AND 1=1) RETURNING "public"."User"."id""# => [Write];
        r#"DELETE FROM "public"."Post" WHERE "public"."Post"."id" IN ($1,$2)"# => [Write];
        r#"SELECT "public"."Post"."id" FROM "public"."Post" WHERE "public"."Post"."authorId" IN ($1) OFFSET $2"# => [Read];
        r#"SELECT COUNT(*) FROM (SELECT "public"."User"."id" FROM "public"."User" WHERE 1=1 OFFSET $1) AS "sub""# => [Read];
        "BEGIN" => [begin(false)];
        "COMMIT" => [Commit];
        "SELECT 1" => [Read];
        r#"SELECT "public"."User"."id" FROM "public"."User" WHERE "public"."User"."id" = $1 LIMIT $2 OFFSET $3 FOR UPDATE"# => [Write];
        "SELECT pg_advisory_lock(72707369)" => [AdvisoryLock];
        "SELECT pg_advisory_unlock(72707369)" => [Write];
        "SELECT EXISTS(SELECT 1 FROM pg_database WHERE datname = $1)" => [Read];
        r#"SELECT "public"."User"."id", COALESCE("aggr_selection_0_Post"."_aggr_count_posts", 0) AS "_aggr_count_posts" FROM "public"."User" LEFT JOIN (SELECT "public"."Post"."authorId", COUNT(*) AS "_aggr_count_posts" FROM "public"."Post" WHERE 1=1 GROUP BY "public"."Post"."authorId") AS "aggr_selection_0_Post" ON ("public"."User"."id" = "aggr_selection_0_Post"."authorId") WHERE 1=1 OFFSET $1"# => [Read];
        r#"INSERT INTO "public"."Tag" ("name") VALUES ($1) ON CONFLICT DO NOTHING"# => [Write];
        // --- SQLAlchemy
        "SELECT users.id AS users_id, users.name AS users_name FROM users WHERE users.id = 5" => [Read];
        "SELECT users.id AS users_id, users.name AS users_name FROM users WHERE users.id = 5 FOR UPDATE OF users NOWAIT" => [Write];
        "SELECT users.id AS users_id FROM users WHERE users.name = 'x' FOR SHARE OF users SKIP LOCKED" => [Write];
        "INSERT INTO users (name) VALUES ('x') RETURNING users.id" => [Write];
        "select pg_catalog.version()" => [Read];
        "select current_schema()" => [Read];
        "show standard_conforming_strings" => [Read];
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = ANY (ARRAY['r', 'p'])" => [Read];
        "SELECT anon_1.users_id FROM (SELECT users.id AS users_id FROM users) AS anon_1" => [Read];
        "SELECT nextval('users_id_seq'::regclass)" => [Write];
        "SELECT pg_catalog.nextval('users_id_seq')" => [Write];
        "SELECT users.id FROM users WHERE users.id = ANY (%(id_1)s::INTEGER[])" => [Read];
        // --- pgbench
        "SELECT abalance FROM pgbench_accounts WHERE aid = 1;" => [Read];
        "UPDATE pgbench_accounts SET abalance = abalance + 3 WHERE aid = 5;" => [Write];
        "UPDATE pgbench_tellers SET tbalance = tbalance + -4 WHERE tid = 2;" => [Write];
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 5, 3, CURRENT_TIMESTAMP);" => [Write];
        "BEGIN;" => [begin(false)];
        "END;" => [Commit];
        r"\set aid random(1, 100000 * :scale)" => [Write];
        "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;" => [Read];
        "vacuum analyze pgbench_branches" => [Write];
        "truncate pgbench_history" => [Write];
        "copy pgbench_accounts from stdin with (freeze on)" => [Write];
        "select count(*) from pgbench_branches" => [Read];
        "BEGIN; UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1; SELECT abalance FROM pgbench_accounts WHERE aid = 1; END;" => [begin(false), Write, Read, Commit];
        // --- pg_dump
        "SET statement_timeout = 0;" => [set("statement_timeout", "0")];
        "SET lock_timeout = 0;" => [set("lock_timeout", "0")];
        "SET idle_in_transaction_session_timeout = 0;" => [set("idle_in_transaction_session_timeout", "0")];
        "SET client_encoding = 'UTF8';" => [set("client_encoding", "'UTF8'")];
        "SET standard_conforming_strings = on;" => [set("standard_conforming_strings", "on")];
        "SELECT pg_catalog.set_config('search_path', '', false);" => [Write];
        "SET check_function_bodies = false;" => [set("check_function_bodies", "false")];
        "SET xmloption = content;" => [set("xmloption", "content")];
        "SET client_min_messages = warning;" => [set("client_min_messages", "warning")];
        "SET row_security = off;" => [set("row_security", "off")];
        "SET default_tablespace = '';" => [set("default_tablespace", "''")];
        "SET default_table_access_method = heap;" => [set("default_table_access_method", "heap")];
        "CREATE TABLE public.t (a integer, b text);" => [Write];
        "ALTER TABLE public.t OWNER TO postgres;" => [Write];
        "COPY public.t (a, b) FROM stdin;" => [Write];
        "COPY (SELECT 1) TO STDOUT" => [Read];
        "COPY public.t (a, b) TO stdout;" => [Read];
        "COPY public.t TO '/tmp/t.csv'" => [Write];
        "COPY (DELETE FROM t RETURNING *) TO STDOUT" => [Write];
        "COPY t FROM PROGRAM 'cat'" => [Write];
        "COPY t TO PROGRAM 'gzip > /tmp/x'" => [Write];
        "SELECT pg_catalog.setval('public.t_id_seq', 1, false);" => [Write];
        "COMMENT ON TABLE public.t IS 'x';" => [Write];
        "GRANT SELECT ON public.t TO app;" => [Write];
        "REVOKE ALL ON SCHEMA public FROM PUBLIC;" => [Write];
        "CREATE INDEX t_a_idx ON public.t USING btree (a);" => [Write];
        "COPY (SELECT * FROM t WHERE a > 1) TO STDOUT WITH (FORMAT csv, HEADER)" => [Read];
        "COPY (SELECT nextval('s')) TO STDOUT" => [Write];
        r#"COPY "public"."T" TO STDOUT"# => [Read];
        "COPY (SELECT pg_advisory_lock(1)) TO STDOUT" => [AdvisoryLock];
        "COPY (COPY t TO STDOUT) TO STDOUT" => [Write];
        "COPY TO STDOUT" => [Write];
        "SET default_with_oids = false;" => [set("default_with_oids", "false")];
        "SELECT pg_catalog.lo_create('16385');" => [Write];
        "SELECT pg_catalog.lo_open('16385', 131072);" => [Write];
        r"SELECT pg_catalog.lowrite(0, '\x0102');" => [Write];
        // --- tricky quoting and comments
        "SELECT 'insert into x'" => [Read];
        "SELECT $$ delete $$" => [Read];
        "SELECT $a$ $$ update $$ $a$" => [Read];
        r#"SELECT "update" FROM t"# => [Read];
        r"SELECT E'\'' || 'x'" => [Read];
        r"SELECT E'it\'s; DELETE FROM t'" => [Read];
        "SELECT 'it''s; DELETE FROM t'" => [Read];
        r"SELECT 'a\' ; DELETE FROM t; --'" => [Read, Write];
        r"SELECT E'a\\' ; DELETE FROM t" => [Read, Write];
        r"SELECT e'\\\'' AS x" => [Read];
        "SELECT /* DELETE FROM t */ 1" => [Read];
        "SELECT /* outer /* inner DELETE */ still comment; UPDATE */ 1" => [Read];
        "SELECT 1 -- ; DELETE" => [Read];
        "SELECT 1 -- c\n FOR UPDATE" => [Write];
        "SELECT * FROM t FOR/*x*/UPDATE" => [Write];
        "SELECT 1 /* unterminated" => [Write];
        "SELECT 'unterminated" => [Write];
        r#"SELECT "unterminated"# => [Write];
        "SELECT $$unterminated" => [Write];
        "SELECT $tag$ x $tag" => [Write];
        "SELECT E'unterminated\\'" => [Write];
        r"SELECT U&'d\0061t\+000061'" => [Read];
        r#"SELECT U&"d\0061t" FROM t"# => [Read];
        r#"SELECT U&"nextval"('s')"# => [Write];
        "SELECT B'1010', X'FF'" => [Read];
        "SELECT N'national'" => [Read];
        "SELECT $1::int, $2" => [Read];
        r#"SELECT "nextval"('s')"# => [Write];
        r#"SELECT "NextVal" FROM t"# => [Read];
        "SELECT nextval FROM t" => [Read];
        "SELECT 'nextval(1)'" => [Read];
        "SELECT $q$nextval('s')$q$" => [Read];
        r#"SELECT "a""b" FROM t"# => [Read];
        r#"SELECT "" FROM t"# => [Write];
        "SELECT $a$ ; $a$; DELETE FROM t" => [Read, Write];
        "SELECT a$b FROM t" => [Read];
        "SELECT 1.5e+10, .5, 1_000, 0x1F" => [Read];
        "SELECT x FROM t WHERE y <> -1 AND z !~ 'a'" => [Read];
        "SELECT 'x'::text || $$--$$" => [Read];
        "SELECT '/*', 1" => [Read];
        r#"SELECT "--" FROM t"# => [Read];
        "SELECT sübstring('é', 1)" => [Read];
        r#"SELECT 'é€😀' AS "😀""# => [Read];
        "SELECT 😀" => [Read];
        "DELETE/**/FROM t" => [Write];
        "SELECT 1/*x*/FROM t" => [Read];
        "SELECT $1$2" => [Read];
        "SELECT $é$ delete $é$" => [Read];
        "SELECT 'a'\n'b'" => [Read];
        "SELECT a.b.c.nextval('x')" => [Write];
        // --- CTEs
        "WITH a AS (SELECT 1) SELECT * FROM a" => [Read];
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) SELECT n FROM r" => [Read];
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d" => [Write];
        "WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT count(*) FROM u" => [Write];
        "WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i" => [Write];
        "WITH m AS MATERIALIZED (SELECT 1) SELECT * FROM m" => [Read];
        "WITH m AS NOT MATERIALIZED (DELETE FROM t RETURNING 1) SELECT 1" => [Write];
        "WITH a AS (SELECT 1) INSERT INTO t SELECT * FROM a" => [Write];
        "WITH a AS (SELECT 1) UPDATE t SET x = 1" => [Write];
        "WITH a AS (SELECT 1) DELETE FROM t" => [Write];
        "WITH a AS (SELECT 1) MERGE INTO t USING a ON true WHEN MATCHED THEN DO NOTHING" => [Write];
        "SELECT * FROM (SELECT * FROM (WITH d AS (DELETE FROM t RETURNING id) SELECT id FROM d) x) y" => [Write];
        "SELECT * FROM t WHERE id IN (WITH a AS (SELECT 1) SELECT * FROM a)" => [Read];
        "WITH a AS (WITH b AS (INSERT INTO t DEFAULT VALUES RETURNING id) SELECT id FROM b) SELECT * FROM a" => [Write];
        "WITH a AS (WITH b AS (SELECT 1) UPDATE t SET x = 1 RETURNING x) SELECT * FROM a" => [Write];
        "WITH a AS (SELECT 1 FROM t FOR UPDATE) SELECT * FROM a" => [Write];
        "WITH a AS (SELECT nextval('s')) SELECT * FROM a" => [Write];
        "WITH a AS (MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE RETURNING t.id) SELECT * FROM a" => [Write];
        r#"WITH "update" AS (SELECT 1) SELECT * FROM "update""# => [Read];
        "WITH a AS (SELECT 'DELETE FROM t') SELECT * FROM a" => [Read];
        "SELECT (SELECT (SELECT (WITH q AS (SELECT 1) SELECT * FROM q)))" => [Read];
        "SELECT (SELECT (SELECT (WITH q AS (DELETE FROM t RETURNING 1) SELECT * FROM q)))" => [Write];
        "WITH a AS (SELECT 1), b AS (SELECT 2) SELECT * FROM a, b" => [Read];
        "WITH a AS (SELECT 1), b AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT * FROM a, b" => [Write];
        "with x as (select 1) select * from x" => [Read];
        "WITH" => [Write];
        "WITH a AS (SELECT 1)" => [Write];
        "(WITH a AS (SELECT 1) SELECT * FROM a)" => [Read];
        "WITH a AS (SELECT 1) (SELECT 2)" => [Write];
        // --- function calls
        "SELECT NEXTVAL('s')" => [Write];
        "SELECT nextval('s')" => [Write];
        r#"SELECT "pg_catalog"."nextval"('s')"# => [Write];
        "SELECT public.my_writer(1)" => [Write];
        "SELECT my_writer(1)" => [Write];
        "SELECT other.my_writer(1)" => [Read];
        "SELECT audit_log('x')" => [Write];
        "SELECT s.audit_log('x')" => [Write];
        r#"SELECT "AUDIT_LOG"('x')"# => [Write];
        "SELECT billing.charge(1)" => [Write];
        r#"SELECT "billing"."charge"(1)"# => [Write];
        "SELECT x.charge(1)" => [Read];
        "SELECT my_reader(1)" => [Read];
        "SELECT * FROM my_fn()" => [Read];
        "SELECT * FROM audit_log()" => [Write];
        "SELECT currval('s')" => [Read];
        "SELECT lastval()" => [Write];
        "SELECT setval('s', 1)" => [Write];
        "SELECT txid_current()" => [Write];
        "SELECT txid_current_if_assigned()" => [Write];
        "SELECT pg_current_xact_id()" => [Write];
        "SELECT pg_current_xact_id_if_assigned()" => [Write];
        "SELECT pg_advisory_xact_lock(1)" => [Write];
        "SELECT pg_advisory_xact_lock_shared(1)" => [Write];
        "SELECT pg_try_advisory_xact_lock(1)" => [Write];
        "SELECT pg_try_advisory_xact_lock_shared(1, 2)" => [Write];
        "SELECT pg_advisory_unlock_shared(1)" => [Write];
        "SELECT pg_notify('ch', 'x')" => [Write];
        "SELECT set_config('app.user', '1', false)" => [Write];
        "SELECT pg_switch_wal()" => [Write];
        "SELECT pg_create_restore_point('x')" => [Write];
        "SELECT pg_terminate_backend(123)" => [Write];
        "SELECT pg_cancel_backend(123)" => [Write];
        "SELECT lo_create(0)" => [Write];
        "SELECT lo_import('/tmp/x')" => [Write];
        "SELECT lo_export(1, '/tmp/x')" => [Write];
        "SELECT lo_unlink(1)" => [Write];
        "SELECT lo_open(1, 131072)" => [Write];
        "SELECT lo_write(0, 'x')" => [Write];
        "SELECT lo_put(1, 0, 'x')" => [Write];
        "SELECT lo_from_bytea(0, 'x')" => [Write];
        "SELECT dblink_exec('conn', 'DELETE FROM t')" => [Write];
        "SELECT pg_sleep(1)" => [Read];
        "SELECT lo_get(1)" => [Read];
        "SELECT now(), current_setting('search_path')" => [Read];
        "SELECT pg_is_in_recovery()" => [Read];
        "SELECT pg_last_wal_replay_lsn()" => [Read];
        "SELECT count(*) FROM t WHERE nextval_col = 1" => [Read];
        "SELECT nextval ('s')" => [Write];
        "SELECT nextval/*c*/('s')" => [Write];
        "SELECT * FROM generate_series(1, 10)" => [Read];
        "SELECT substring('abc' FOR 2)" => [Read];
        "SELECT substring('abc' FROM 1 FOR 2)" => [Read];
        "SELECT overlay('abc' PLACING 'x' FROM 1 FOR 1)" => [Read];
        "VALUES (nextval('s'))" => [Write];
        "VALUES (1, 'a'), (2, 'b')" => [Read];
        "TABLE users" => [Read];
        "SELECT pg_try_advisory_lock_shared(1)" => [AdvisoryLock];
        "SELECT pg_advisory_lock_shared(1)" => [AdvisoryLock];
        "SELECT pg_advisory_lock(1), nextval('s')" => [AdvisoryLock];
        "INSERT INTO t SELECT pg_advisory_lock(1)" => [AdvisoryLock];
        "SELECT pg_catalog.pg_advisory_lock(1)" => [AdvisoryLock];
        r#"SELECT "pg_advisory_unlock_all"()"# => [AdvisoryUnlockAll];
        "SELECT pg_advisory_lock FROM t" => [Read];
        "SELECT PG_ADVISORY_LOCK(hashtext('job'))" => [AdvisoryLock];
        "SELECT pg_advisory_unlock_all(), pg_advisory_lock(2)" => [AdvisoryLock];
        "SELECT 1 FROM t WHERE pg_try_advisory_lock(id) LIMIT 1" => [AdvisoryLock];
        // --- locking clauses and INTO
        "SELECT * FROM t FOR UPDATE" => [Write];
        "SELECT * FROM t FOR NO KEY UPDATE" => [Write];
        "SELECT * FROM t FOR SHARE" => [Write];
        "SELECT * FROM t FOR KEY SHARE" => [Write];
        "SELECT * FROM t FOR UPDATE OF t SKIP LOCKED" => [Write];
        "SELECT * FROM (SELECT * FROM t FOR UPDATE) s" => [Write];
        "SELECT * FROM t WHERE id IN (SELECT id FROM u FOR SHARE)" => [Write];
        "(SELECT 1) UNION (SELECT 2)" => [Read];
        "((SELECT 1))" => [Read];
        "(SELECT * FROM t FOR UPDATE)" => [Write];
        "(VALUES (1)) UNION ALL (TABLE t)" => [Read];
        "(DELETE FROM t)" => [Write];
        "SELECT * INTO new_t FROM t" => [Write];
        "SELECT a, b INTO TEMP new_t FROM t" => [CreateTemp];
        "SELECT 1 INTO STRICT x" => [Write];
        "SELECT * FROM t ORDER BY a FOR UPDATE" => [Write];
        "SELECT * FROM t LIMIT 1 FOR UPDATE" => [Write];
        "select * from t for update" => [Write];
        r#"SELECT "for", "update" FROM t"# => [Read];
        "SELECT t.for FROM t" => [Read];
        "SELECT x FROM t WHERE a = 'FOR UPDATE'" => [Read];
        "SELECT * FROM t WHERE update = 1" => [Read];
        // --- EXPLAIN
        "EXPLAIN SELECT 1" => [Read];
        "EXPLAIN INSERT INTO t VALUES (1)" => [Read];
        "EXPLAIN ANALYZE SELECT 1" => [Read];
        "EXPLAIN ANALYZE INSERT INTO t VALUES (1)" => [Write];
        "EXPLAIN ANALYSE DELETE FROM t" => [Write];
        "EXPLAIN (ANALYZE, BUFFERS) INSERT INTO t VALUES (1)" => [Write];
        "EXPLAIN (ANALYZE true, BUFFERS) UPDATE t SET a = 1" => [Write];
        "EXPLAIN (ANALYZE false) DELETE FROM t" => [Read];
        "EXPLAIN (ANALYZE off, FORMAT JSON) DELETE FROM t" => [Read];
        "EXPLAIN (ANALYZE 'maybe') DELETE FROM t" => [Write];
        "EXPLAIN (FORMAT JSON) SELECT * FROM t" => [Read];
        "EXPLAIN (ANALYZE, VERBOSE, BUFFERS, FORMAT YAML) SELECT * FROM t" => [Read];
        "EXPLAIN ANALYZE SELECT nextval('s')" => [Write];
        "EXPLAIN SELECT nextval('s')" => [Read];
        "EXPLAIN ANALYZE VERBOSE SELECT * FROM t" => [Read];
        "EXPLAIN VERBOSE UPDATE t SET a = 1" => [Read];
        "EXPLAIN (SELECT 1)" => [Read];
        "EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE" => [Write];
        "EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d" => [Write];
        "EXPLAIN EXECUTE s(1)" => [Write];
        "EXPLAIN CREATE TABLE x AS SELECT 1" => [Write];
        "EXPLAIN" => [Write];
        "EXPLAIN ANALYZE SELECT pg_advisory_lock(1)" => [AdvisoryLock];
        "EXPLAIN (ANALYZE) MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE" => [Write];
        "EXPLAIN (ANALYZE" => [Write];
        "EXPLAIN (ANALYZE,) SELECT 1" => [Write];
        "explain (costs off) with a as (select 1) select * from a" => [Read];
        // --- transaction control
        "BEGIN WORK" => [begin(false)];
        "BEGIN TRANSACTION" => [begin(false)];
        "BEGIN READ ONLY" => [begin(true)];
        "BEGIN TRANSACTION READ ONLY" => [begin(true)];
        "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE" => [begin(false)];
        "BEGIN ISOLATION LEVEL REPEATABLE READ" => [begin(false)];
        "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE" => [begin(false)];
        "BEGIN READ WRITE" => [begin(false)];
        "BEGIN NOT DEFERRABLE" => [begin(false)];
        "BEGIN READ ONLY, READ WRITE" => [begin(false)];
        "START TRANSACTION" => [begin(false)];
        "START TRANSACTION READ ONLY" => [begin(true)];
        "start transaction isolation level read uncommitted, read only" => [begin(true)];
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE" => [begin(false)];
        "BEGIN READ" => [Write];
        "BEGIN ISOLATION LEVEL" => [Write];
        "BEGIN ISOLATION LEVEL REPEATABLE COMMITTED" => [Write];
        "BEGIN ATOMIC" => [Write];
        "START" => [Write];
        "START READ ONLY" => [Write];
        "COMMIT WORK" => [Commit];
        "COMMIT TRANSACTION" => [Commit];
        "COMMIT AND NO CHAIN" => [Commit];
        "COMMIT AND CHAIN" => [Commit];
        "END" => [Commit];
        "END TRANSACTION" => [Commit];
        "END foo" => [Write];
        "COMMIT AND" => [Write];
        "ROLLBACK WORK" => [Rollback];
        "ROLLBACK AND CHAIN" => [Rollback];
        "ABORT" => [Rollback];
        "ABORT TRANSACTION" => [Rollback];
        "ROLLBACK TO sp1" => [RollbackTo];
        "ROLLBACK TO SAVEPOINT sp1" => [RollbackTo];
        r#"ROLLBACK TRANSACTION TO SAVEPOINT "sp 1""# => [RollbackTo];
        "ROLLBACK WORK TO sp1" => [RollbackTo];
        "ROLLBACK TO" => [Write];
        "SAVEPOINT sp1" => [Savepoint];
        "RELEASE sp1" => [Release];
        "RELEASE SAVEPOINT sp1" => [Release];
        "SAVEPOINT" => [Write];
        "SAVEPOINT a b" => [Write];
        "PREPARE TRANSACTION 'tx1'" => [PrepareTransaction];
        "COMMIT PREPARED 'tx1'" => [CommitPrepared];
        "ROLLBACK PREPARED 'tx1'" => [RollbackPrepared];
        "COMMIT PREPARED" => [Write];
        "SET TRANSACTION READ ONLY" => [SetTransaction { read_only: Some(true) }];
        "SET TRANSACTION READ WRITE" => [SetTransaction { read_only: Some(false) }];
        // A hot standby refuses SERIALIZABLE: such a transaction is never one a replica serves.
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE" => [SetTransaction { read_only: Some(false) }];
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY" => [SetTransaction { read_only: Some(false) }];
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ" => [SetTransaction { read_only: None }];
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY" => [Begin { read_only: false }];
        "START TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE, DEFERRABLE" => [Begin { read_only: false }];
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" => [Begin { read_only: true }];
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE" => [SetSessionCharacteristics { read_only: None, serializable: Some(true) }];
        "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'" => [SetTransaction { read_only: None }];
        "SET TRANSACTION" => [Write];
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY" => [SetSessionCharacteristics { read_only: Some(true), serializable: None }];
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ" => [SetSessionCharacteristics { read_only: None, serializable: Some(false) }];
        "set session characteristics as transaction read write" => [SetSessionCharacteristics { read_only: Some(false), serializable: None }];
        "SET SESSION CHARACTERISTICS AS TRANSACTION" => [Write];
        // --- SET / RESET
        r#"SET search_path TO "$user", public"# => [set("search_path", r#""$user", public"#)];
        "SET LOCAL statement_timeout = '5s'" => [set_local("statement_timeout", "'5s'")];
        "SET SESSION statement_timeout TO 5000" => [set("statement_timeout", "5000")];
        "SET TIME ZONE 'America/New_York'" => [set("timezone", "'America/New_York'")];
        "SET TIME ZONE LOCAL" => [set("timezone", "LOCAL")];
        "SET LOCAL TIME ZONE INTERVAL '+00:00' HOUR TO MINUTE" => [set_local("timezone", "INTERVAL '+00:00' HOUR TO MINUTE")];
        "SET ROLE admin" => [set("role", "admin")];
        "SET ROLE NONE" => [set("role", "NONE")];
        "SET LOCAL ROLE 'app'" => [set_local("role", "'app'")];
        "SET role TO admin" => [set("role", "admin")];
        "SET SESSION AUTHORIZATION 'bob'" => [set("session_authorization", "'bob'")];
        "SET SESSION AUTHORIZATION DEFAULT" => [set("session_authorization", "DEFAULT")];
        "SET SESSION SESSION AUTHORIZATION bob" => [set("session_authorization", "bob")];
        "SET application_name = 'my app'" => [set("application_name", "'my app'")];
        r#"SET "Application_Name" = 'x'"# => [set("Application_Name", "'x'")];
        "SET myapp.user_id = '42'" => [set("myapp.user_id", "'42'")];
        "SET MyApp.User_Id TO 42" => [set("myapp.user_id", "42")];
        r#"SET LOCAL myapp."Tenant" = 7"# => [set_local("myapp.Tenant", "7")];
        "SET work_mem = '64MB' /* trailing */" => [set("work_mem", "'64MB'")];
        "SET work_mem = /* leading */ '64MB'" => [set("work_mem", "'64MB'")];
        "SET SCHEMA 'public'" => [set("search_path", "'public'")];
        "SET NAMES 'UTF8'" => [set("client_encoding", "'UTF8'")];
        "SET XML OPTION DOCUMENT" => [set("xmloption", "DOCUMENT")];
        "SET CONSTRAINTS ALL DEFERRED" => [Write];
        "SET" => [Write];
        "SET foo" => [Write];
        "SET foo =" => [Write];
        "SET foo bar" => [Write];
        "SET x=-1" => [set("x", "-1")];
        "set datestyle to iso, mdy" => [set("datestyle", "iso, mdy")];
        "SET search_path = \"My Schema\", public" => [set("search_path", "\"My Schema\", public")];
        "RESET statement_timeout" => [reset("statement_timeout")];
        "RESET ALL" => [Reset { name: None }];
        "RESET TIME ZONE" => [reset("timezone")];
        "RESET ROLE" => [reset("role")];
        "RESET SESSION AUTHORIZATION" => [reset("session_authorization")];
        "RESET TRANSACTION ISOLATION LEVEL" => [reset("transaction_isolation")];
        "RESET myapp.user_id" => [reset("myapp.user_id")];
        "RESET" => [Write];
        "RESET ALL x" => [Write];
        r#"RESET "Foo""# => [reset("Foo")];
        "RESET Search_Path" => [reset("search_path")];
        // --- pgnear in-band
        "SET pgnear.route = 'primary'" => [pset("route", "primary")];
        "SET pgnear.route TO replica" => [pset("route", "replica")];
        "set PGNEAR.Route to 'Auto'" => [pset("route", "Auto")];
        "SET pgnear.min_lsn = '0/16B3748'" => [pset("min_lsn", "0/16B3748")];
        "SET pgnear.route = AUTO" => [pset("route", "auto")];
        "SET LOCAL pgnear.route = 'primary'" => [pset("route", "primary")];
        r#"SET "pgnear.route" = 'primary'"# => [pset("route", "primary")];
        "SET pgnear.min_lsn = E'0/1'" => [pset("min_lsn", "0/1")];
        "SET pgnear.route = 'it''s'" => [pset("route", "it's")];
        "SET pgnear.route = $$primary$$" => [pset("route", "primary")];
        "SET pgnear.route" => [Write];
        "SHOW pgnear.write_lsn" => [pshow("write_lsn")];
        "SHOW PGNEAR.Region" => [pshow("region")];
        "show pgnear.primary_region;" => [pshow("primary_region")];
        "SHOW pgnear" => [Read];
        "SHOW ALL" => [Read];
        "SHOW TIME ZONE" => [Read];
        "SHOW TRANSACTION ISOLATION LEVEL" => [Read];
        "SHOW" => [Write];
        "RESET pgnear.min_lsn" => [PgnearReset { name: Some("min_lsn".into()) }];
        "RESET PGNEAR.ROUTE" => [PgnearReset { name: Some("route".into()) }];
        // --- DISCARD / LISTEN
        "DISCARD ALL" => [Discard { all: true }];
        "DISCARD PLANS" => [Discard { all: false }];
        "DISCARD SEQUENCES" => [Discard { all: false }];
        "DISCARD TEMP" => [Discard { all: false }];
        "discard temporary" => [Discard { all: false }];
        "DISCARD" => [Write];
        "DISCARD EVERYTHING" => [Write];
        "LISTEN jobs" => [Listen];
        r#"LISTEN "Jobs""# => [Listen];
        "UNLISTEN jobs" => [Unlisten { all: false }];
        "UNLISTEN *" => [Unlisten { all: true }];
        "NOTIFY jobs, 'x'" => [Write];
        "LISTEN" => [Write];
        // --- temporary objects
        "CREATE TEMP TABLE t (a int)" => [CreateTemp];
        // Objects created in the session's temporary schema, however they are created.
        "CREATE TYPE pg_temp.mood AS ENUM ('ok')" => [CreateTemp];
        "CREATE TABLE pg_temp.foo (a int)" => [CreateTemp];
        r#"CREATE TABLE "pg_temp".foo (a int)"# => [CreateTemp];
        "CREATE OR REPLACE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'" => [CreateTemp];
        "CREATE VIEW pg_temp_3.v AS SELECT 1" => [CreateTemp];
        "CREATE SEQUENCE pg_temp.s" => [CreateTemp];
        "CREATE INDEX ON pg_temp.foo (a)" => [CreateTemp];
        "CREATE TABLE pg_temporary.x (a int)" => [Write];
        "CREATE TABLE pg_temp_x.y (a int)" => [Write];
        "SELECT 1 AS a INTO TEMP t" => [CreateTemp];
        "SELECT 1 AS a INTO TEMPORARY TABLE t" => [CreateTemp];
        "SELECT 1 AS a INTO LOCAL TEMP t" => [CreateTemp];
        "SELECT 1 AS a INTO t" => [Write];
        "CREATE TEMPORARY TABLE IF NOT EXISTS t (a int)" => [CreateTemp];
        "CREATE GLOBAL TEMPORARY TABLE t (a int)" => [CreateTemp];
        "CREATE LOCAL TEMP TABLE t (a int)" => [CreateTemp];
        "CREATE TEMP TABLE t AS SELECT * FROM u" => [CreateTemp];
        "CREATE TEMP VIEW v AS SELECT 1" => [CreateTemp];
        "CREATE OR REPLACE TEMP VIEW v AS SELECT 1" => [CreateTemp];
        "CREATE TEMP SEQUENCE s" => [CreateTemp];
        "CREATE TEMP RECURSIVE VIEW v (n) AS SELECT 1" => [CreateTemp];
        r#"create temporary table "T" (id serial) on commit drop"# => [CreateTemp];
        "CREATE TABLE t (a int)" => [Write];
        "CREATE UNLOGGED TABLE t (a int)" => [Write];
        "CREATE TABLE temp (a int)" => [Write];
        "CREATE OR REPLACE VIEW v AS SELECT 1" => [Write];
        "CREATE TEMP FUNCTION f()" => [Write];
        // --- PREPARE / EXECUTE / DEALLOCATE
        "PREPARE q1 AS SELECT 1" => [prep("q1")];
        "PREPARE Q1 (int, text) AS SELECT $1, $2" => [prep("q1")];
        r#"PREPARE "Q1" AS INSERT INTO t VALUES (1)"# => [prep("Q1")];
        "PREPARE q1" => [Write];
        "PREPARE q1 AS" => [Write];
        "EXECUTE q1" => [exec("q1")];
        "EXECUTE q1 (1, 'a')" => [exec("q1")];
        r#"EXECUTE "Q1"(1)"# => [exec("Q1")];
        "EXECUTE" => [Write];
        "EXECUTE q1 extra" => [Write];
        "DEALLOCATE q1" => [dealloc(Some("q1"))];
        "DEALLOCATE PREPARE q1" => [dealloc(Some("q1"))];
        "DEALLOCATE ALL" => [dealloc(None)];
        "DEALLOCATE PREPARE ALL" => [dealloc(None)];
        "DEALLOCATE" => [Write];
        // --- other writes
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a" => [Write];
        "DROP TABLE t" => [Write];
        "TRUNCATE t" => [Write];
        "VACUUM" => [Write];
        "ANALYZE t" => [Write];
        "CLUSTER t" => [Write];
        "REINDEX TABLE t" => [Write];
        "CALL my_proc(1)" => [Write];
        "DO $$ BEGIN PERFORM 1; END $$" => [Write];
        "LOCK TABLE t IN ACCESS EXCLUSIVE MODE" => [Write];
        "NOTIFY ch" => [Write];
        "REFRESH MATERIALIZED VIEW mv" => [Write];
        "SECURITY LABEL ON TABLE t IS 'x'" => [Write];
        "IMPORT FOREIGN SCHEMA s FROM SERVER srv INTO public" => [Write];
        "LOAD 'auto_explain'" => [Write];
        "CHECKPOINT" => [Write];
        "DECLARE c CURSOR FOR SELECT 1" => [Write];
        "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t" => [Write];
        "FETCH 10 FROM c" => [Write];
        "FETCH NEXT IN c" => [Write];
        "MOVE FORWARD 5 IN c" => [Write];
        "CLOSE c" => [Write];
        "CLOSE ALL" => [Write];
        "ALTER SYSTEM SET work_mem = '1GB'" => [Write];
        "CREATE EXTENSION IF NOT EXISTS pgcrypto" => [Write];
        "REASSIGN OWNED BY a TO b" => [Write];
        "INSERT INTO t DEFAULT VALUES" => [Write];
        "UPDATE t SET a = (SELECT max(a) FROM u)" => [Write];
        "DELETE FROM t USING u WHERE t.id = u.id" => [Write];
        "ALTER ROLE app SET search_path = x" => [Write];
        // --- malformed
        "SELEC 1" => [Write];
        ")))" => [Write];
        "(((" => [Write];
        "SELECT (1" => [Write];
        "SELECT 1)" => [Write];
        "SELECT )(" => [Write];
        "'just a string'" => [Write];
        "42" => [Write];
        "$1" => [Write];
        "*" => [Write];
        r#""select" 1"# => [Write];
        "/* only an unterminated comment" => [Write];
        "FOO BAR" => [Write];
        "; DELETE FROM t" => [Write];
        r"\d users" => [Write];
        "(1)" => [Write];
        "SELECT $" => [Read];
        // --- empty
        "" => [Empty];
        "   " => [Empty];
        ";" => [Empty];
        ";;;" => [Empty];
        "-- just a comment" => [Empty];
        "/* c */ ; /* d */" => [Empty];
        "/* a /* nested */ */" => [Empty];
        "\n\t\r" => [Empty];
        // --- multi-statement
        "SELECT 1; SELECT 2;" => [Read, Read];
        "SELECT 1; DELETE FROM t" => [Read, Write];
        "BEGIN; SELECT 1; COMMIT;" => [begin(false), Read, Commit];
        "BEGIN READ ONLY; SELECT 1; COMMIT" => [begin(true), Read, Commit];
        "SET search_path = a; SELECT 1" => [set("search_path", "a"), Read];
        "SELECT 1;;SELECT 2" => [Read, Read];
        r#"SELECT 'a;b'; SELECT "c;d" FROM t"# => [Read, Read];
        "SELECT 1; SELECT 'unterminated" => [Read, Write];
        "SELECT (1; DELETE FROM t)" => [Write];
        ")); SELECT 1" => [Write, Read];
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END; SELECT 3" => [Write, Read];
        "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; END; COMMIT" => [Write, Commit];
        "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO log VALUES (1); UPDATE c SET n = n + 1); SELECT 1" => [Write, Read];
        "CREATE FUNCTION f() RETURNS int AS $$ BEGIN RETURN 1; END $$ LANGUAGE plpgsql; SELECT f()" => [Write, Read];
        "SELECT 1 -- comment; DELETE\n; SELECT 2" => [Read, Read];
        "LISTEN a; LISTEN b" => [Listen, Listen];
        "SAVEPOINT a; RELEASE a; ROLLBACK TO a" => [Savepoint, Release, RollbackTo];
        "SET pgnear.route = 'primary'; SHOW pgnear.route; RESET pgnear.route" => [pset("route", "primary"), pshow("route"), PgnearReset { name: Some("route".into()) }];
        "DISCARD ALL; SELECT pg_advisory_unlock_all()" => [Discard { all: true }, AdvisoryUnlockAll];
        "SELECT 1 /* ; */ ; /* ; */ SELECT 2" => [Read, Read];
    }
}

#[test]
fn table_driven() {
    let wf = wf();
    let cases = table();
    assert!(cases.len() >= 300, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for (sql, expected) in &cases {
        let got: Vec<Kind> = classify(sql, &wf)
            .statements
            .into_iter()
            .map(|s| s.kind)
            .collect();
        if &got != expected {
            failures.push(format!(
                "{sql:?}\n    expected {expected:?}\n    got      {got:?}"
            ));
        }
    }
    println!("{} table cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn is_read_follows_statements() {
    assert!(classify("", &[]).is_read());
    assert!(classify(";", &[]).is_read());
    assert!(classify("-- x", &[]).is_read());
    assert!(classify("SELECT 1; SELECT 2", &[]).is_read());
    assert!(!classify("SELECT 1; DELETE FROM t", &[]).is_read());
    assert!(!classify("BEGIN READ ONLY", &[]).is_read());
    assert!(!classify("SELECT pg_advisory_lock(1)", &[]).is_read());
    assert!(!classify("SET x = 1", &[]).is_read());
    assert!(!classify("SELEC 1", &[]).is_read());
}

#[test]
fn hints() {
    let h = |sql: &str| classify(sql, &[]).hint;
    assert_eq!(h("SELECT 1"), None);
    assert_eq!(h("/* pgnear:primary */ SELECT 1"), Some(Hint::Primary));
    assert_eq!(h("SELECT 1 /*pgnear:replica*/"), Some(Hint::Replica));
    assert_eq!(h("SELECT /* PGNEAR : Primary */ 1"), Some(Hint::Primary));
    assert_eq!(
        h("SELECT /*\n\tpgnear:\treplica\n*/ 1"),
        Some(Hint::Replica)
    );
    assert_eq!(h("-- pgnear:replica\nSELECT 1"), Some(Hint::Replica));
    assert_eq!(h("SELECT 1 -- pgnear:primary"), Some(Hint::Primary));
    assert_eq!(h("SELECT '/* pgnear:primary */'"), None);
    assert_eq!(h("SELECT $$ -- pgnear:primary $$"), None);
    assert_eq!(h(r#"SELECT "/* pgnear:primary */""#), None);
    assert_eq!(
        h("/* app='x', pgnear:replica, route=1 */ SELECT 1"),
        Some(Hint::Replica)
    );
    assert_eq!(
        h("/* pgnear:replica */ SELECT 1 /* pgnear:primary */"),
        Some(Hint::Primary)
    );
    assert_eq!(h("/* pgnear:primaryx */ SELECT 1"), None);
    assert_eq!(h("/* notpgnear:primary */ SELECT 1"), None);
    assert_eq!(h("/* pgnear primary */ SELECT 1"), None);
    assert_eq!(h("/* pgnear: */ SELECT 1"), None);
    assert_eq!(
        h("/* outer /* pgnear:primary */ */ SELECT 1"),
        Some(Hint::Primary)
    );
    assert_eq!(
        h("SELECT 1; /* pgnear:replica */ SELECT 2"),
        Some(Hint::Replica)
    );
    let c = classify("/* pgnear:primary", &[]);
    assert_eq!(c.hint, Some(Hint::Primary));
    assert_eq!(c.statements[0].kind, Write);
    let c = classify("/* pgnear:primary */", &[]);
    assert_eq!((c.hint, c.is_read()), (Some(Hint::Primary), true));
    let c = classify("/* pgnear:replica */ UPDATE t SET a = 1", &[]);
    assert_eq!((c.hint, c.is_read()), (Some(Hint::Replica), false));
}

/// xorshift64* — a tiny deterministic generator for the random-input test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const FRAGMENTS: &[&str] = &[
    "SELECT",
    "select",
    "INSERT",
    "UPDATE",
    "DELETE",
    "MERGE",
    "WITH",
    "AS",
    "(",
    ")",
    ",",
    ";",
    ".",
    "'",
    "''",
    "\"",
    "E'",
    "e'\\'",
    "U&'",
    "U&\"",
    "B'",
    "X'",
    "$$",
    "$a$",
    "$1",
    "$",
    "--",
    "\n",
    "/*",
    "*/",
    "/* pgnear:primary */",
    "pgnear:replica",
    "FOR",
    "UPDATE",
    "SHARE",
    "NO",
    "KEY",
    "INTO",
    "nextval",
    "pg_advisory_lock",
    "pg_advisory_unlock_all",
    "BEGIN",
    "ATOMIC",
    "CASE",
    "END",
    "COMMIT",
    "ROLLBACK",
    "TO",
    "SAVEPOINT",
    "SET",
    "LOCAL",
    "SESSION",
    "TIME",
    "ZONE",
    "ROLE",
    "=",
    "RESET",
    "ALL",
    "SHOW",
    "pgnear",
    "pgnear.route",
    "EXPLAIN",
    "ANALYZE",
    "COPY",
    "STDOUT",
    "FROM",
    "PREPARE",
    "EXECUTE",
    "DEALLOCATE",
    "TRANSACTION",
    "READ",
    "ONLY",
    "CREATE",
    "TEMP",
    "TABLE",
    "LISTEN",
    "UNLISTEN",
    "*",
    "DISCARD",
    "1.5e+3",
    ".5",
    "::",
    "\\",
    "é",
    "€",
    "😀",
    "\u{0}",
    "\t",
    " ",
    "  ",
    "\"\"",
    "'é'",
    "$é$",
    "1",
    "x",
    "t",
    "a.b",
];

fn random_sql(rng: &mut Rng) -> String {
    let mut s = String::new();
    for _ in 0..rng.below(40) {
        match rng.below(10) {
            0 => s.push(char::from(rng.below(128) as u8)),
            1 => s.push(['é', '€', '😀', 'ß', '中', '\u{feff}'][rng.below(6)]),
            _ => s.push_str(FRAGMENTS[rng.below(FRAGMENTS.len())]),
        }
        if rng.below(3) == 0 {
            s.push(' ');
        }
    }
    s
}

#[test]
fn random_inputs_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let wf = wf();
    for _ in 0..20_000 {
        let sql = random_sql(&mut rng);
        let c = classify(&sql, &wf);
        assert!(!c.statements.is_empty(), "{sql:?}");
        if c.statements.iter().any(|s| s.kind == Empty) {
            assert_eq!(c.statements.len(), 1, "{sql:?}");
        }
    }
}

/// Reads that must run on the primary although they are reads: settings a standby shows
/// differently, and objects of the session's temporary schema.
#[test]
fn standby_revealing_reads_go_to_the_primary() {
    let h = |sql: &str| classify(sql, &[]);
    for sql in [
        "SHOW transaction_read_only",
        "show TRANSACTION_READ_ONLY",
        "SHOW default_transaction_read_only",
        "SHOW in_hot_standby",
        "SELECT current_setting('transaction_read_only')",
        "SELECT setting FROM pg_settings WHERE name = 'in_hot_standby'",
        "SELECT * FROM pg_temp.foo",
        "SELECT 'ok'::pg_temp.mood",
        "SELECT pg_temp_12.f()",
    ] {
        let c = h(sql);
        assert_eq!((c.hint, c.is_read()), (Some(Hint::Primary), true), "{sql}");
    }
    for sql in [
        "SELECT 'transaction_read_only is a setting'",
        "SELECT pg_temp FROM t",
        "SHOW search_path",
        "SELECT 1",
    ] {
        assert_eq!(h(sql).hint, None, "{sql}");
    }
}

#[test]
fn database_lifecycle_statements() {
    let cases = [
        ("DROP DATABASE x", Some("x")),
        ("drop database if exists \"Test DB\"", Some("Test DB")),
        ("DROP DATABASE x WITH (FORCE)", Some("x")),
        ("ALTER DATABASE x RENAME TO y", Some("x")),
        ("ALTER DATABASE x SET work_mem = '1MB'", None),
        ("CREATE DATABASE y TEMPLATE x", Some("x")),
        (
            "CREATE DATABASE y WITH OWNER app TEMPLATE = x ENCODING 'UTF8'",
            Some("x"),
        ),
        ("CREATE DATABASE y", None),
        ("DROP TABLE x", None),
        ("SELECT 1", None),
        ("DROP", None),
        ("", None),
    ];
    for (sql, db) in cases {
        assert_eq!(database_lifecycle(sql).as_deref(), db, "{sql}");
    }
}

#[test]
fn every_prefix_of_tricky_inputs() {
    let wf = wf();
    for (sql, _) in table() {
        for (i, _) in sql.char_indices() {
            let c = classify(&sql[..i], &wf);
            assert!(!c.statements.is_empty());
        }
    }
}

#[test]
fn huge_inputs() {
    let wf = wf();
    let deep = "(".repeat(200_000) + &")".repeat(200_000);
    assert_eq!(classify(&deep, &wf).statements[0].kind, Write);
    let select_deep = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
    assert!(classify(&select_deep, &wf).is_read());
    let many = "SELECT 1;".repeat(50_000);
    let c = classify(&many, &wf);
    assert_eq!(c.statements.len(), 50_000);
    assert!(c.is_read());
    let comment = format!("/*{}*/ SELECT 1", "/*".repeat(100_000));
    assert_eq!(classify(&comment, &wf).statements[0].kind, Write);
    let long_str = format!("SELECT '{}'", "x".repeat(1 << 20));
    assert!(classify(&long_str, &wf).is_read());
}
