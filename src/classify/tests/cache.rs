//! The classifier's caches: by text, by statement shape, bounded, shared between threads.

use std::sync::Arc;

use super::*;

#[test]
fn fast_path_is_used_for_oltp() {
    let cat = catalog();
    for sql in [
        "SELECT id, name, email FROM users WHERE id = $1",
        "SELECT * FROM t WHERE a = lower($1) ORDER BY id LIMIT 10",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        "INSERT INTO t (a, b) VALUES ($1, $2)",
        "DELETE FROM t WHERE id = $1",
        "SELECT * FROM t FOR UPDATE",
        "SELECT nextval('s');",
    ] {
        assert!(fast::try_fast(sql, &cat).is_some(), "{sql:?}");
    }
    for sql in [
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SELECT 1; SELECT 2",
        "SELECT * INTO x FROM t",
        "INSERT INTO t VALUES (1) RETURNING id",
        "SELECT set_config('a', 'b', false)",
        "SHOW x",
    ] {
        assert!(fast::try_fast(sql, &cat).is_none(), "{sql:?}");
    }
}

#[test]
fn classifier_cache_counts_and_reuses() {
    let cl = Classifier::new(100, catalog());
    let a = cl.classify("SELECT 1");
    let b = cl.classify("SELECT 1");
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!((cl.hits(), cl.misses()), (1, 1));
    // Exact-text keys: a different spelling is a different entry.
    cl.classify("select 1");
    assert_eq!((cl.hits(), cl.misses()), (1, 2));
    assert_eq!(cl.cached(), 2);
}

#[test]
fn texts_without_literals_are_cached_by_text_and_the_others_by_shape() {
    let cl = Classifier::new(100, catalog());
    for sql in ["COMMIT", "SELECT v FROM t", "SELECT v FROM t WHERE id = 1"] {
        cl.classify(sql);
    }
    cl.classify("SELECT v FROM t WHERE id = 2");
    assert_eq!((cl.hits(), cl.misses()), (1, 3));
    let inner = cl.inner.read().unwrap();
    // Found on the first lookup, without masking the text again.
    assert!(inner.cache.get("COMMIT").is_some());
    assert!(inner.cache.get("SELECT v FROM t").is_some());
    assert_eq!((inner.cache.len(), inner.shapes.len()), (2, 1));
}

#[test]
fn classifier_catalog_replacement_clears_cache() {
    let cl = Classifier::new(100, FunctionCatalog::builtin_only(&[], &[]));
    assert_eq!(cl.classify("SELECT my_fn()").access, W);
    assert_eq!(cl.classify("SELECT my_fn()").access, W);
    assert_eq!((cl.hits(), cl.misses()), (1, 1));
    cl.set_catalog(FunctionCatalog::from_pg_proc(
        [("my_fn".to_string(), 's')],
        &[],
        &[],
    ));
    assert_eq!(cl.cached(), 0);
    assert_eq!(cl.classify("SELECT my_fn()").access, R);
    assert_eq!((cl.hits(), cl.misses()), (1, 2));
}

#[test]
fn classifier_is_bounded_and_skips_huge_statements() {
    let cl = Classifier::new(16, catalog());
    for i in 0..500 {
        cl.classify(&format!("SELECT {i}"));
    }
    assert!(cl.cached() <= 32, "cache grew to {}", cl.cached());
    let huge = format!("SELECT '{}'", "x".repeat(MAX_CACHED_LEN));
    let before = cl.misses();
    cl.classify(&huge);
    cl.classify(&huge);
    assert_eq!(cl.misses(), before + 2);
}

#[test]
fn classifier_is_thread_safe() {
    let cl = Arc::new(Classifier::new(64, catalog()));
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let cl = Arc::clone(&cl);
            std::thread::spawn(move || {
                for i in 0..200 {
                    let sql = format!("SELECT {}", i % 10);
                    assert_eq!(cl.classify(&sql).access, R);
                    if t == 0 && i == 100 {
                        cl.set_catalog(catalog());
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(cl.hits() + cl.misses(), 800);
}

/// Timing loop: `cargo test --release -- --ignored --nocapture timing`.
#[test]
#[ignore]
fn timing() {
    use std::time::Instant;
    let cat = catalog();
    let n = 50_000u32;
    for sql in [
        "SELECT id, name, email FROM users WHERE id = $1",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 12345",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
        "SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.created_at > now() - interval '1 day' ORDER BY o.id LIMIT 50",
        "BEGIN",
        "SET search_path = public",
        "WITH x AS (SELECT 1) SELECT * FROM x",
    ] {
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(classify(std::hint::black_box(sql), &cat));
        }
        let uncached = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(classify_full(sql, &cat, Hints::default()));
        }
        let full = t.elapsed() / n;
        println!("uncached {uncached:?}  full-tree {full:?}  :: {sql}");
    }
    let cl = Classifier::new(1000, catalog());
    let sql = "SELECT id, name, email FROM users WHERE id = $1";
    cl.classify(sql);
    let n = 2_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(cl.classify(std::hint::black_box(sql)));
    }
    println!("cache hit {:?}", t.elapsed() / n);
}

/// Statements that differ only in constants share a cached classification, and it is the one
/// each would get on its own; statements whose classification carries values never share.
#[test]
fn shapes_share_only_value_free_classifications() {
    let cat = catalog();
    let pairs = [
        (
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 99",
        ),
        (
            "UPDATE pgbench_accounts SET abalance = abalance + -5 WHERE aid = 3",
            "UPDATE pgbench_accounts SET abalance = abalance + 4000 WHERE aid = 7",
        ),
        (
            "INSERT INTO t (a, b) VALUES (1, 'x')",
            "INSERT INTO t (a, b) VALUES (2, 'it''s')",
        ),
        (
            "SELECT * FROM t WHERE s = 'a' LIMIT 5",
            "SELECT * FROM t WHERE s = 'b' LIMIT 50000",
        ),
        (
            "/* causeway:primary */ SELECT 1",
            "/* causeway:primary */ SELECT 2",
        ),
        ("SELECT nextval('s1')", "SELECT nextval('s2')"),
        ("SELECT my_volatile_fn(1)", "SELECT my_volatile_fn(2)"),
        (
            "DELETE FROM t WHERE id = 1; SELECT 2",
            "DELETE FROM t WHERE id = 3; SELECT 4",
        ),
        ("SELECT '; DELETE FROM t'", "SELECT 'x'"),
        // Carry values: classified each on their own.
        (
            "SELECT set_config('search_path', 'a', false)",
            "SELECT set_config('search_path', 'b', false)",
        ),
        ("SELECT pg_advisory_lock(1)", "SELECT pg_advisory_lock(2)"),
        ("SET statement_timeout = 100", "SET statement_timeout = 200"),
        (
            "SET causeway.consistency_key = 'a'",
            "SET causeway.consistency_key = 'b'",
        ),
        ("BEGIN; SELECT 1", "BEGIN; SELECT 2"),
    ];
    for (first, second) in pairs {
        let cl = Classifier::new(100, catalog());
        cl.classify(first);
        let shared = cl.classify(second);
        assert_eq!(
            *shared,
            classify(second, &cat),
            "{second:?} after {first:?}"
        );
    }
    let cl = Classifier::new(100, catalog());
    cl.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 1");
    cl.classify("SELECT abalance FROM pgbench_accounts WHERE aid = 2");
    assert_eq!((cl.hits(), cl.misses(), cl.cached()), (1, 1, 1));
    let a = cl.classify("SELECT set_config('search_path', 'a', false)");
    let b = cl.classify("SELECT set_config('search_path', 'b', false)");
    assert!(!Arc::ptr_eq(&a, &b));
    assert!(a.pin.is_some() && b.pin.is_some());
}

/// Pairs of texts with one shape where the first classifies as a read (or unpinned) and the
/// second must not: the cache must never hand the first's classification to the second.
#[test]
fn the_shape_cache_never_hands_a_read_to_a_write() {
    let rows = [
        ("now", 's'),
        ("abs", 'i'),
        ("nextval", 'v'),
        ("set_config", 'v'),
        ("audit.now", 'v'),
    ];
    let cat =
        || FunctionCatalog::from_pg_proc(rows.iter().map(|(n, v)| (n.to_string(), *v)), &[], &[]);
    let pairs = [
        // EXPLAIN's options are literals: ANALYZE 1 executes the DELETE.
        (
            "EXPLAIN (ANALYZE 0) DELETE FROM t WHERE id = 5",
            "EXPLAIN (ANALYZE 1) DELETE FROM t WHERE id = 5",
        ),
        (
            "EXPLAIN (ANALYZE 'off') UPDATE t SET a = 1",
            "EXPLAIN (ANALYZE 'on') UPDATE t SET a = 1",
        ),
        // A lone carriage return ends a line comment, so the quotes after it are code.
        (
            "SELECT 'a' --\r, '\n' AS b, 1 AS c --'",
            "SELECT 'a' --\r, '\n' AS b, 1; DELETE FROM t --'",
        ),
        // Not a number with an exponent: `e` is a hex digit, `-` an operator.
        ("SELECT 0x1e-abs(1)", "SELECT 0x1e-nextval(1)"),
        ("SELECT 1e-abs(1)", "SELECT 1e-nextval(1)"),
    ];
    for (read, write) in pairs {
        let direct = classify(write, &cat());
        assert_eq!(direct.access, Access::Write, "{write}");
        let cached = Classifier::new(100, cat());
        cached.classify(read);
        assert_eq!(*cached.classify(write), direct, "{write} after {read}");
    }
    // set_config's third argument decides the session pin.
    let cached = Classifier::new(100, cat());
    cached.classify("SELECT set_config('search_path', 'x', 'true')");
    assert_eq!(
        cached
            .classify("SELECT set_config('search_path', 'x', 'false')")
            .pin,
        Some(PinReason::SessionSet)
    );
    // A dot inside a quoted function name is part of the name, not a schema.
    assert_eq!(
        classify("SELECT \"audit.now\"()", &cat()).access,
        Access::Write
    );
    assert_eq!(
        classify("SELECT pg_catalog.now()", &cat()).access,
        Access::Read
    );
}
