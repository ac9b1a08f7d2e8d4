//! Micro-benchmarks of the hot path's pure parts: the classifier (cache hit and miss), the
//! server frame scan with response matching, and the consistency gate.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use pgnear::config::ConsistencyMode;
use pgnear::consistency::gate;
use pgnear::consistency::watcher::ReplicaState;
use pgnear::lsn::Lsn;
use pgnear::protocol::backend::header;
use pgnear::router::cache::ClassifyCache;
use pgnear::router::classify::classify;
use pgnear::session::expect::{Expectations, Owner, Pending};

/// A 1 KB statement in the style of an ORM (ActiveRecord/Ecto-like): many quoted columns, joins.
fn orm_statement(variant: usize) -> String {
    let mut sql = String::from("SELECT ");
    let cols: Vec<String> = (0..40)
        .map(|i| format!("\"users\".\"column_{i}\""))
        .collect();
    sql.push_str(&cols.join(", "));
    sql.push_str(
        " FROM \"users\" INNER JOIN \"accounts\" ON \"accounts\".\"user_id\" = \"users\".\"id\" ",
    );
    sql.push_str(&format!(
        "WHERE \"users\".\"id\" = $1 AND \"accounts\".\"state\" = 'active' /* request {variant} */ ORDER BY \"users\".\"created_at\" DESC LIMIT $2"
    ));
    sql
}

fn classifier(c: &mut Criterion) {
    let sql = orm_statement(0);
    assert!((900..1300).contains(&sql.len()), "{}", sql.len());
    let cache = ClassifyCache::new(16 * 1024, Vec::new());
    cache.get_or_classify(&sql);
    c.bench_function("classify/cache_hit_1kb", |b| {
        b.iter(|| cache.get_or_classify(black_box(&sql)))
    });
    c.bench_function("classify/miss_1kb", |b| {
        b.iter(|| classify(black_box(&sql), &[]))
    });
    let mut n = 0;
    c.bench_function("classify/cache_miss_insert_1kb", |b| {
        b.iter_batched(
            || {
                n += 1;
                orm_statement(n)
            },
            |s| cache.get_or_classify(&s),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("classify/pgbench_select", |b| {
        b.iter(|| {
            classify(
                black_box("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"),
                &[],
            )
        })
    });
}

/// A typical answer: RowDescription, 100 DataRows, CommandComplete, ReadyForQuery.
fn response() -> Vec<u8> {
    let mut out = Vec::new();
    let frame = |out: &mut Vec<u8>, tag: u8, body: &[u8]| {
        out.push(tag);
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
    };
    frame(&mut out, b'T', &[0u8; 30]);
    for _ in 0..100 {
        frame(&mut out, b'D', &[0u8; 60]);
    }
    frame(&mut out, b'C', b"SELECT 100\0");
    frame(&mut out, b'Z', b"I");
    out
}

fn frame_scan(c: &mut Criterion) {
    let bytes = response();
    c.bench_function("scan/100_rows_with_matching", |b| {
        b.iter(|| {
            let mut e = Expectations::default();
            e.push(Pending::Query, Owner::Client);
            let mut pos = 0;
            let mut forwarded = 0;
            while let Some((tag, len)) = header(&bytes[pos..]) {
                if e.on_frame(tag).forward {
                    forwarded += len;
                }
                pos += len;
            }
            black_box(forwarded)
        })
    });
}

fn consistency_gate(c: &mut Criterion) {
    let state = ReplicaState {
        up: true,
        in_recovery: true,
        replay: Some(Lsn(1000)),
        lag_bytes: Some(0),
        lag_seconds: Some(0.0),
    };
    let max_lag = Duration::from_secs(10);
    c.bench_function("gate/decide", |b| {
        b.iter(|| {
            gate::decide(
                ConsistencyMode::Session,
                black_box(Some(Lsn(999))),
                &state,
                max_lag,
            )
        })
    });
}

criterion_group!(benches, classifier, frame_scan, consistency_gate);
criterion_main!(benches);
