//! Bounded, thread-safe cache of [`classify`] results keyed by the full query text.
//!
//! 16 shards, each a `Mutex<HashMap>` with its own share of the capacity. When a shard is full,
//! inserting a new text evicts one arbitrary entry of that shard (the first in the map's
//! iteration order, which is unrelated to age or use: random eviction), so memory stays bounded
//! without a burst of misses. Texts longer than [`MAX_CACHED_LEN`] are classified on every call;
//! for them `mark_write` only remembers a 64-bit hash (a collision can only turn a read into a
//! write, the safe direction).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

use rustc_hash::FxBuildHasher;

use super::classify::{classify, Classified, Kind, Statement};

/// Longest query text that is cached.
pub const MAX_CACHED_LEN: usize = 8 * 1024;
const SHARDS: usize = 16;
/// How many long texts marked as writes are remembered (the set is cleared when full).
const MAX_LONG_WRITES: usize = 1024;

struct Shard {
    map: HashMap<Box<str>, Arc<Classified>, FxBuildHasher>,
    cap: usize,
}

pub struct ClassifyCache {
    shards: Box<[Mutex<Shard>]>,
    write_functions: Vec<String>,
    long_writes: Mutex<HashSet<u64, FxBuildHasher>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map half-updated in a harmful way.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The same statements, all `Write`, keeping the hint.
fn as_write(c: &Classified) -> Classified {
    Classified {
        statements: c
            .statements
            .iter()
            .map(|s| Statement {
                kind: Kind::Write,
                span: s.span,
            })
            .collect(),
        hint: c.hint,
    }
}

impl ClassifyCache {
    /// A cache of at most `capacity` texts (0 disables caching).
    pub fn new(capacity: usize, write_functions: Vec<String>) -> Self {
        let n = capacity.clamp(1, SHARDS);
        let shards = (0..n)
            .map(|i| {
                let cap = capacity / n + usize::from(i < capacity % n);
                // Pre-size modestly: no rehash on the way up for typical sizes.
                let map = HashMap::with_capacity_and_hasher(cap.min(4096), FxBuildHasher);
                Mutex::new(Shard { map, cap })
            })
            .collect();
        ClassifyCache {
            shards,
            write_functions,
            long_writes: Mutex::new(HashSet::default()),
        }
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        // Bits 32.. are used by neither the table index nor the control byte of the inner map.
        &self.shards[(hash >> 32) as usize % self.shards.len()]
    }

    /// The classification of `sql`, from the cache or computed (and cached) now.
    pub fn get_or_classify(&self, sql: &str) -> Arc<Classified> {
        if sql.len() > MAX_CACHED_LEN {
            let c = classify(sql, &self.write_functions);
            let marked = {
                let set = lock(&self.long_writes);
                !set.is_empty() && set.contains(&FxBuildHasher.hash_one(sql))
            };
            return Arc::new(if marked { as_write(&c) } else { c });
        }
        let shard = self.shard(FxBuildHasher.hash_one(sql));
        if let Some(hit) = lock(shard).map.get(sql) {
            return Arc::clone(hit);
        }
        let fresh = Arc::new(classify(sql, &self.write_functions));
        let mut g = lock(shard);
        if let Some(raced) = g.map.get(sql) {
            // Another thread got here first (possibly with mark_write): keep its entry.
            return Arc::clone(raced);
        }
        g.insert(sql, Arc::clone(&fresh));
        fresh
    }

    /// Records that the replica rejected `sql` as read-only: from now on it classifies as all
    /// `Write` (hint kept).
    pub fn mark_write(&self, sql: &str) {
        let hash = FxBuildHasher.hash_one(sql);
        if sql.len() > MAX_CACHED_LEN {
            let mut set = lock(&self.long_writes);
            if set.len() >= MAX_LONG_WRITES {
                set.clear();
            }
            set.insert(hash);
            return;
        }
        let shard = self.shard(hash);
        let known = lock(shard).map.get(sql).cloned();
        let base = known.unwrap_or_else(|| Arc::new(classify(sql, &self.write_functions)));
        let flipped = Arc::new(as_write(&base));
        lock(shard).insert(sql, flipped);
    }

    /// Number of cached texts.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Shard {
    fn insert(&mut self, sql: &str, c: Arc<Classified>) {
        if let Some(slot) = self.map.get_mut(sql) {
            *slot = c;
            return;
        }
        if self.cap == 0 {
            return;
        }
        if self.map.len() >= self.cap {
            if let Some(victim) = self.map.keys().next().cloned() {
                self.map.remove(&victim);
            }
        }
        self.map.insert(sql.into(), c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::classify::Hint;

    #[test]
    fn hit_returns_same_arc() {
        let cache = ClassifyCache::new(100, vec![]);
        let a = cache.get_or_classify("SELECT 1");
        let b = cache.get_or_classify("SELECT 1");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(a.is_read());
        assert_eq!(cache.len(), 1);
        let c = cache.get_or_classify("SELECT 2");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn mark_write_flips_and_keeps_hint() {
        let cache = ClassifyCache::new(100, vec![]);
        let sql = "/* pgnear:replica */ SELECT f(1); SELECT 2";
        assert!(cache.get_or_classify(sql).is_read());
        cache.mark_write(sql);
        let c = cache.get_or_classify(sql);
        assert!(!c.is_read());
        assert_eq!(c.hint, Some(Hint::Replica));
        assert_eq!(c.statements.len(), 2);
        assert!(c.statements.iter().all(|s| s.kind == Kind::Write));
        // Marking a text never seen before works too.
        cache.mark_write("SELECT g()");
        assert_eq!(
            cache.get_or_classify("SELECT g()").statements[0].kind,
            Kind::Write
        );
        assert!(cache.get_or_classify("SELECT h()").is_read());
    }

    #[test]
    fn long_text_not_cached_but_marks_stick() {
        let cache = ClassifyCache::new(100, vec![]);
        let long = format!("SELECT '{}'", "x".repeat(MAX_CACHED_LEN));
        let a = cache.get_or_classify(&long);
        let b = cache.get_or_classify(&long);
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(a.is_read());
        assert_eq!(cache.len(), 0);
        cache.mark_write(&long);
        assert!(!cache.get_or_classify(&long).is_read());
        assert_eq!(cache.len(), 0);
        let exact = format!("SELECT '{}'", "y".repeat(MAX_CACHED_LEN - 9));
        assert_eq!(exact.len(), MAX_CACHED_LEN);
        cache.get_or_classify(&exact);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn capacity_bound_holds() {
        for cap in [0usize, 1, 5, 16, 17, 100, 1000] {
            let cache = ClassifyCache::new(cap, vec![]);
            for i in 0..5000 {
                let sql = format!("SELECT * FROM t WHERE id = {i}");
                assert!(cache.get_or_classify(&sql).is_read());
                if i % 7 == 0 {
                    cache.mark_write(&sql);
                }
                assert!(cache.len() <= cap, "cap {cap}: {}", cache.len());
            }
            if cap >= 100 {
                // Random eviction keeps the cache (nearly) full.
                assert!(cache.len() >= cap * 9 / 10, "cap {cap}: {}", cache.len());
            }
        }
    }

    #[test]
    fn write_functions_are_used() {
        let cache = ClassifyCache::new(10, vec!["audit.log_access".to_owned()]);
        assert!(!cache
            .get_or_classify("SELECT audit.log_access(1)")
            .is_read());
        assert!(cache
            .get_or_classify("SELECT other.log_access(1)")
            .is_read());
    }

    #[test]
    fn concurrent_use() {
        let cache = Arc::new(ClassifyCache::new(64, vec![]));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let sql = format!("SELECT {}", (i * 7 + t) % 200);
                        let c = cache.get_or_classify(&sql);
                        assert!(c.is_read() || sql == "SELECT 0");
                        if i % 50 == 0 {
                            cache.mark_write("SELECT 0");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(cache.len() <= 64);
    }

    /// Manual timing check, not an assertion:
    /// `cargo test --release -- --ignored --nocapture timing`.
    #[test]
    #[ignore]
    fn timing() {
        use std::hint::black_box;
        use std::time::Instant;
        let orm = |i: usize| {
            let mut s = format!(
                "SELECT \"users\".\"id\", \"users\".\"email\", \"users\".\"name\", \
                 \"users\".\"created_at\", \"users\".\"updated_at\" FROM \"users\" \
                 INNER JOIN \"memberships\" ON \"memberships\".\"user_id\" = \"users\".\"id\" \
                 WHERE \"users\".\"account_id\" = $1 AND \"users\".\"deleted_at\" IS NULL \
                 /* q{i} */ AND \"memberships\".\"role\" IN ($2, $3, $4)"
            );
            while s.len() < 1000 {
                s.push_str(" AND \"users\".\"flag_");
                s.push_str(&s.len().to_string());
                s.push_str("\" = TRUE");
            }
            s.push_str(" ORDER BY \"users\".\"id\" ASC LIMIT $5 OFFSET $6");
            s
        };
        let n = 20_000;
        let texts: Vec<String> = (0..n).map(orm).collect();
        println!("statement length: {} bytes", texts[0].len());
        let cache = ClassifyCache::new(2 * n, vec!["audit.log".to_owned()]);
        let t0 = Instant::now();
        for t in &texts {
            black_box(cache.get_or_classify(t));
        }
        let miss = t0.elapsed() / n as u32;
        let t0 = Instant::now();
        for t in &texts {
            black_box(classify(black_box(t), &[]));
        }
        let bare = t0.elapsed() / n as u32;
        let full = ClassifyCache::new(1000, vec![]);
        let t0 = Instant::now();
        for t in &texts {
            black_box(full.get_or_classify(t));
        }
        let evicting = t0.elapsed() / n as u32;
        let rounds = 10;
        let t0 = Instant::now();
        for _ in 0..rounds {
            for t in texts.iter().take(1000) {
                black_box(cache.get_or_classify(t));
            }
        }
        let hit = t0.elapsed() / (rounds * 1000);
        println!("miss (classify + insert): {miss:?}/op, miss with eviction: {evicting:?}/op");
        println!("classify alone: {bare:?}/op, hit: {hit:?}/op");
    }
}
