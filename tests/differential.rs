//! Differential harness: a corpus of SQL run directly on the primary and through pgnear (reads land
//! on the replica), comparing command tags, column names and types, rows and errors, in text
//! (psql, simple protocol) and binary (tokio-postgres, extended protocol) result formats.

mod common;

use common::*;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Client;

/// Statements that read (pgnear sends them to the replica).
const READS: &[&str] = &[
    "SELECT 1 AS one, 'two' AS two, NULL::int AS nothing",
    "SELECT * FROM diff_t ORDER BY id",
    "SELECT id, name, score, tags, doc, created, blob FROM diff_t WHERE id > 2 ORDER BY id DESC",
    "SELECT count(*), sum(score), avg(score)::numeric(10,4), max(name) FROM diff_t",
    "SELECT g, g * 2 AS twice FROM generate_series(1, 50) g",
    "SELECT id, rank() OVER (ORDER BY score DESC) FROM diff_t ORDER BY id",
    "WITH t AS (SELECT id, score FROM diff_t) SELECT * FROM t WHERE score > 1.5 ORDER BY id",
    "SELECT doc->>'k' AS k, jsonb_array_length(doc->'a') FROM diff_t WHERE doc ? 'k' ORDER BY id",
    "SELECT tags[1], array_length(tags, 1), cardinality(tags) FROM diff_t ORDER BY id",
    "SELECT created AT TIME ZONE 'UTC', date_trunc('day', created) FROM diff_t ORDER BY id",
    "SELECT encode(blob, 'hex'), length(blob) FROM diff_t ORDER BY id",
    "SELECT true, false, 3.14::float8, 2.5::float4, 10::int2, 10000000000::int8, 'x'::char(3)",
    "SELECT '1 day 2 hours'::interval, '2024-02-29'::date, '12:34:56'::time, 'a,b'::text",
    "SELECT '192.168.0.1/24'::inet, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, 12.50::money",
    "SELECT * FROM diff_t WHERE false",
    "VALUES (1, 'a'), (2, 'b')",
    "TABLE diff_t",
    "SHOW DateStyle",
    "EXPLAIN (COSTS OFF) SELECT * FROM diff_t WHERE id = 1",
    "SELECT name FROM diff_t WHERE name LIKE 'it''s%' ORDER BY 1",
    "SELECT $$dollar ; quoted$$, E'tab\\there', U&'d\\0061t\\+000061'",
    "SELECT 1/0",
    "SELECT * FROM no_such_table",
    "SELECT nosuchcolumn FROM diff_t",
    "SELECT repeat('x', 100000) AS big",
    "SELECT string_agg(name, ',' ORDER BY id) FROM diff_t",
    "SELECT pg_typeof(score), pg_typeof(tags) FROM diff_t LIMIT 1",
];

/// Statements that write, run inside a transaction that is rolled back (so both sides see the
/// same data); pgnear runs them on the primary.
const WRITES: &[&str] = &[
    "INSERT INTO diff_t (id, name, score) VALUES (100, 'new', 1.0), (101, 'newer', 2.0)",
    "UPDATE diff_t SET score = score + 1 WHERE id <= 3",
    "DELETE FROM diff_t WHERE id = 5",
    "INSERT INTO diff_t (id, name) VALUES (200, 'r') RETURNING id, name, score",
    "SELECT id FROM diff_t WHERE id = 1 FOR UPDATE",
    "INSERT INTO diff_t (id) VALUES (1)",
    "CREATE TABLE diff_tmp AS SELECT * FROM diff_t",
    "WITH moved AS (DELETE FROM diff_t WHERE id = 4 RETURNING *) SELECT count(*) FROM moved",
];

async fn setup() {
    on_primary(
        "DROP TABLE IF EXISTS diff_t;
             CREATE TABLE diff_t (id int PRIMARY KEY, name text, score numeric, tags text[],
                                  doc jsonb, created timestamptz, blob bytea);
             INSERT INTO diff_t SELECT i, 'it''s row ' || i, i * 0.75, ARRAY['a' || i, 'b'],
                    jsonb_build_object('k', i, 'a', jsonb_build_array(1, 2, i)),
                    '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 hour',
                    decode(lpad(to_hex(i), 4, '0'), 'hex')
             FROM generate_series(1, 8) i;",
    )
    .await;
}

/// Text format, simple protocol, through psql: stdout (tags, columns, rows) and stderr (errors).
fn psql_text(url: &str, sql: &str) -> (String, String) {
    let (_, out, err) = psql(url, &["-c", sql], None);
    // psql's error text has no server-dependent parts for these statements.
    (out, err)
}

/// A column value's raw bytes in the binary format.
struct Raw(Option<Vec<u8>>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(raw.to_vec())))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Binary format, extended protocol: column names and types, rows as raw bytes, or the error.
async fn binary(
    c: &Client,
    sql: &str,
) -> Result<(Vec<(String, u32)>, Vec<Vec<Option<Vec<u8>>>>), String> {
    let stmt = c.prepare(sql).await.map_err(|e| error_text(&e))?;
    let columns = stmt
        .columns()
        .iter()
        .map(|col| (col.name().to_string(), col.type_().oid()))
        .collect();
    let rows = c.query(&stmt, &[]).await.map_err(|e| error_text(&e))?;
    let rows = rows
        .iter()
        .map(|r| (0..r.len()).map(|i| r.get::<_, Raw>(i).0).collect())
        .collect();
    Ok((columns, rows))
}

fn error_text(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or(e.to_string(), |d| {
        format!("{} {}", d.code().code(), d.message())
    })
}

#[test]
fn direct_and_through_pgnear_agree() {
    run(async {
        setup().await;
        let p = proxy(REPLICA, |_| {}).await;
        let direct_url = cluster().primary_url_from(PRIMARY);
        let via_url = url(&p);
        let direct = connect(&direct_url).await;
        let via = connect(&via_url).await;
        let mut compared = 0;
        for sql in READS {
            assert_eq!(
                psql_text(&direct_url, sql),
                psql_text(&via_url, sql),
                "text: {sql}"
            );
            assert_eq!(
                binary(&direct, sql).await,
                binary(&via, sql).await,
                "binary: {sql}"
            );
            compared += 1;
        }
        for sql in WRITES {
            let wrapped = format!("BEGIN; {sql}; ROLLBACK;");
            assert_eq!(
                psql_text(&direct_url, &wrapped),
                psql_text(&via_url, &wrapped),
                "text: {sql}"
            );
            // One side at a time: both would otherwise wait on each other's uncommitted rows.
            let mut results = Vec::new();
            for c in [&direct, &via] {
                c.batch_execute("BEGIN").await.unwrap();
                results.push(binary(c, sql).await);
                c.batch_execute("ROLLBACK").await.unwrap();
            }
            let (v, d) = (results.pop().unwrap(), results.pop().unwrap());
            assert_eq!(d, v, "binary: {sql}");
            compared += 1;
        }
        assert_eq!(compared, READS.len() + WRITES.len());
        // The reads really ran on the replica.
        let on_replica: bool = via
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(on_replica);
        p.shutdown().await;
    });
}
