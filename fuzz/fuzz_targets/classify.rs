//! The SQL classifier and its cache.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgnear::router::cache::ClassifyCache;
use pgnear::router::classify::{classify, Hint, Kind};

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let wf = vec!["my_write_fn".to_string(), "app.touch".to_string()];
    let c = classify(sql, &wf);
    // Deterministic.
    assert_eq!(classify(sql, &wf), c);
    // Never an empty list; `Empty` only alone.
    assert!(!c.statements.is_empty());
    if c.statements.len() > 1 {
        assert!(c.statements.iter().all(|s| s.kind != Kind::Empty));
    }
    // A read is made of reads only.
    if c.is_read() {
        assert!(c
            .statements
            .iter()
            .all(|s| matches!(s.kind, Kind::Read | Kind::Empty)));
    }
    // A leading primary hint comment always wins and changes nothing else.
    let hinted = format!("/* pgnear:primary */ {sql}");
    let h = classify(&hinted, &wf);
    assert_eq!(h.hint, Some(Hint::Primary));
    assert_eq!(h.statements, c.statements);

    // The cache gives what `classify` gives, and `mark_write` turns every statement into a
    // write, keeping the hint and the count.
    let cache = ClassifyCache::new(4, wf.clone());
    assert_eq!(*cache.get_or_classify(sql), c);
    assert_eq!(*cache.get_or_classify(sql), c);
    cache.mark_write(sql);
    let w = cache.get_or_classify(sql);
    assert_eq!(w.hint, c.hint);
    assert_eq!(w.statements.len(), c.statements.len());
    assert!(w.statements.iter().all(|s| s.kind == Kind::Write));
    assert!(cache.len() <= 4);
});
