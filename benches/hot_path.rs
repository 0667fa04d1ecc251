//! Micro-benchmarks of the per-message work: framing client and server streams, classifying
//! cached and uncached statements, the routing decision, and the pool's priority permit queue
//! (uncontended fast path and a contended push/pop cycle).
//!
//! `cargo bench --bench hot_path` (add `-- --warm-up-time 1 --measurement-time 3` for a quick
//! look, or a name filter such as `-- queue`).

use std::hint::black_box;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use causeway::classify::{Classifier, FunctionCatalog, classify};
use causeway::config::{Fallback, ReplicaStrategy};
use causeway::pool::queue::{AcquireError, Class, Permit, PermitQueue, QueueConfig};
use causeway::protocol::{self, DEFAULT_MAX_MESSAGE_BYTES, tag};
use causeway::route::{self, Policy, ReplicaView, SessionView};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

/// Typical OLTP statements: pgbench's, a CRUD lookup, a keyed page, and transaction control.
const OLTP: &[&str] = &[
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
    "SELECT id, name, email FROM users WHERE id = $1",
    "SELECT id, total, status FROM orders WHERE customer_id = $1 ORDER BY created_at DESC LIMIT 20",
    "BEGIN",
    "COMMIT",
];

/// Analytic statements: a join with aggregates and `now()`, and a CTE with a window function.
const ANALYTIC: &[&str] = &[
    "SELECT c.region, date_trunc('day', o.created_at) AS day, count(*), sum(o.total) \
     FROM orders o JOIN customers c ON c.id = o.customer_id \
     WHERE o.created_at > now() - interval '30 days' GROUP BY 1, 2 ORDER BY 2 DESC",
    "WITH recent AS (SELECT customer_id, total, created_at FROM orders \
     WHERE created_at > now() - interval '7 days') \
     SELECT customer_id, sum(total) AS spent, \
     rank() OVER (ORDER BY sum(total) DESC) AS rnk \
     FROM recent GROUP BY customer_id HAVING count(*) > 2 ORDER BY rnk LIMIT 100",
];

fn catalog() -> FunctionCatalog {
    let rows = [
        ("now", 's'),
        ("count", 'i'),
        ("sum", 'i'),
        ("date_trunc", 'i'),
        ("rank", 'i'),
    ];
    FunctionCatalog::from_pg_proc(rows.iter().map(|(n, v)| (n.to_string(), *v)), &[], &[])
}

fn concat(frames: &[protocol::Frame]) -> Bytes {
    let mut buf = BytesMut::new();
    for f in frames {
        buf.extend_from_slice(&f.bytes);
    }
    buf.freeze()
}

/// Splits `stream` into frames as the relay does (one `decode_frame` per message). The copy
/// into a fresh buffer is setup, outside the measurement.
fn bench_framing(c: &mut Criterion, name: &str, stream: &Bytes, messages: u64) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(messages));
    g.bench_function(name, |b| {
        b.iter_batched_ref(
            || BytesMut::from(&stream[..]),
            |buf| {
                let mut n = 0;
                while let Ok(Some(f)) = protocol::decode_frame(buf, DEFAULT_MAX_MESSAGE_BYTES) {
                    n += f.bytes.len();
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn framing(c: &mut Criterion) {
    // A server reply as the relay sees it: RowDescription, 10 DataRows, CommandComplete, RFQ.
    let mut reply = vec![protocol::row_description_text(&["a", "b"])];
    for _ in 0..10 {
        reply.push(protocol::data_row_text(&[
            Some("12345"),
            Some("hello world"),
        ]));
    }
    reply.push(protocol::command_complete("SELECT 10"));
    reply.push(protocol::ready_for_query(protocol::TxStatus::Idle));
    bench_framing(c, "server reply (13 messages)", &concat(&reply), 13);

    // A pipelined extended-protocol request, as pgbench -M extended sends it.
    let aid = 4242i32.to_string();
    let extended = [
        protocol::encode_parse("", OLTP[0], &[]),
        protocol::encode_bind("", "", &[], &[Some(aid.as_bytes())], &[]),
        protocol::encode_describe(b'P', ""),
        protocol::encode_execute("", 0),
        protocol::encode_sync(),
    ];
    let extended = concat(&extended);
    bench_framing(c, "client Parse+Bind+Describe+Execute+Sync", &extended, 5);

    // The same batch framed and then inspected as the session does: the Parse's SQL and the
    // Bind's statement name (what classification and prepared-statement tracking read).
    c.bench_function("frame/client P+B+D+E+S, parse Parse and Bind bodies", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&extended[..]),
            |buf| {
                let mut n = 0;
                while let Ok(Some(f)) = protocol::decode_frame(buf, DEFAULT_MAX_MESSAGE_BYTES) {
                    match f.tag {
                        tag::FE_PARSE => {
                            n += protocol::parse_parse(f.body()).map_or(0, |p| p.sql.len())
                        }
                        tag::FE_BIND => {
                            n += protocol::parse_bind(f.body()).map_or(0, |b| b.statement.len())
                        }
                        _ => n += 1,
                    }
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });

    let simple =
        protocol::encode_query("SELECT abalance FROM pgbench_accounts WHERE aid = 4242;").bytes;
    bench_framing(c, "client simple Query", &simple, 1);
}

fn classification(c: &mut Criterion) {
    let cat = catalog();
    for (i, sql) in OLTP.iter().enumerate() {
        c.bench_function(&format!("classify uncached oltp#{i}"), |b| {
            b.iter(|| black_box(classify(black_box(sql), &cat)))
        });
    }
    for (i, sql) in ANALYTIC.iter().enumerate() {
        let name = if i == 0 {
            "classify uncached analytic".to_string()
        } else {
            format!("classify uncached analytic#{i}")
        };
        c.bench_function(&name, |b| {
            b.iter(|| black_box(classify(black_box(sql), &cat)))
        });
    }
    let cached = Classifier::new(1000, catalog());
    for sql in OLTP.iter().chain(ANALYTIC) {
        cached.classify(sql);
    }
    c.bench_function("classify cache hit", |b| {
        b.iter(|| black_box(cached.classify(black_box(OLTP[0]))))
    });
    c.bench_function("classify cache hit analytic", |b| {
        b.iter(|| black_box(cached.classify(black_box(ANALYTIC[0]))))
    });
    // The simple protocol inlines values: each text is new, its shape is not.
    let texts: Vec<String> = (0..4096)
        .map(|i| {
            format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
                i * 7919
            )
        })
        .collect();
    cached.classify(&texts[0]);
    let mut next = 0;
    c.bench_function("classify shape hit (new literal each time)", |b| {
        b.iter(|| {
            next = (next + 1) % texts.len();
            black_box(cached.classify(black_box(&texts[next])))
        })
    });
}

fn routing(c: &mut Criterion) {
    let class = classify(OLTP[0], &catalog());
    let replicas = vec![
        ReplicaView {
            usable: true,
            in_use: 3,
            weight: 1,
            replayed: 100,
            lagging: false,
        };
        2
    ];
    let session = SessionView {
        route_mode: causeway::classify::RouteMode::Auto,
        min_lsn: 50,
        sticky: false,
        serializable: false,
    };
    let policy = Policy {
        strategy: ReplicaStrategy::LeastConnections,
        fallback: Fallback::Primary,
    };
    c.bench_function("route a read", |b| {
        let mut pick = 0u64;
        b.iter(|| {
            pick += 1;
            black_box(route::route(&class, session, &replicas, policy, pick))
        })
    });
}

// ---------------------------------------------------------------------------------------------
// Priority permit queue

const LONG: Duration = Duration::from_secs(30);

/// The proxy's defaults (priority on, 500 ms aging, 1000 waiters, background share 0.35),
/// with priority and the share as given.
fn queue(permits: usize, priority: bool, background_share: u16) -> Arc<PermitQueue> {
    Arc::new(PermitQueue::new(QueueConfig {
        permits,
        priority,
        aging: Duration::from_millis(500),
        max_waiters: 1000,
        background_share,
    }))
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// A waker that records its waiter's index when woken, so the contended cycle polls exactly
/// the waiters that were granted (as an executor would), never scanning all of them.
struct IndexWaker {
    index: usize,
    woken: Arc<Mutex<Vec<usize>>>,
}

impl Wake for IndexWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.lock().expect("woken list").push(self.index);
    }
}

type AcquireFuture = Pin<Box<dyn Future<Output = Result<Permit, AcquireError>>>>;

/// Waiter classes of the contended cycle: mostly point reads and writes with their commits,
/// some plain reads and a few analytic ones, interleaved.
fn mixed_classes(n: usize) -> Vec<Class> {
    const PATTERN: [Class; 10] = [
        Class::PointRead,
        Class::Write,
        Class::PointRead,
        Class::Commit,
        Class::Read,
        Class::PointRead,
        Class::Write,
        Class::Analytic,
        Class::PointRead,
        Class::Commit,
    ];
    (0..n).map(|i| PATTERN[i % PATTERN.len()]).collect()
}

/// One contended cycle: every permit is held, `classes.len()` waiters queue up (one `acquire`
/// each, polled once), then the held permits come back and each granted waiter takes its
/// permit and returns it at once, which grants the next. Returns the grant order. A queued
/// `acquire` arms a tokio timer for its timeout; `Duration::MAX` means none.
fn contended_cycle(
    q: &Arc<PermitQueue>,
    timeout: Duration,
    classes: &[Class],
    wakers: &[Waker],
    woken: &Mutex<Vec<usize>>,
) -> Vec<usize> {
    let held: Vec<Permit> = (0..q.permits())
        .map(|_| q.try_acquire().expect("a free permit"))
        .collect();
    let mut waiters: Vec<Option<AcquireFuture>> = classes
        .iter()
        .map(|&class| {
            let q = Arc::clone(q);
            let fut: AcquireFuture = Box::pin(async move { q.acquire(class, timeout).await });
            Some(fut)
        })
        .collect();
    for (i, w) in waiters.iter_mut().enumerate() {
        let mut cx = Context::from_waker(&wakers[i]);
        let pending = w
            .as_mut()
            .expect("fresh")
            .as_mut()
            .poll(&mut cx)
            .is_pending();
        assert!(pending, "waiter {i} should queue");
    }
    drop(held);
    let mut order = Vec::with_capacity(classes.len());
    let mut batch = Vec::new();
    while order.len() < classes.len() {
        std::mem::swap(&mut batch, &mut *woken.lock().expect("woken list"));
        assert!(!batch.is_empty(), "waiters left but none woken");
        for i in batch.drain(..) {
            let Some(fut) = waiters[i].as_mut() else {
                continue;
            };
            let mut cx = Context::from_waker(&wakers[i]);
            if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                drop(r.expect("granted"));
                waiters[i] = None;
                order.push(i);
            }
        }
    }
    order
}

fn permit_queue(c: &mut Criterion) {
    let q = queue(20, true, 550);
    c.bench_function("queue uncontended try_acquire+release", |b| {
        b.iter(|| drop(black_box(q.try_acquire())))
    });
    // Without a background share the queue skips its permit-time accounting (a clock read
    // and an exp() on every change of the permits in use).
    let q0 = queue(20, true, 0);
    c.bench_function(
        "queue uncontended try_acquire+release (no background share)",
        |b| b.iter(|| drop(black_box(q0.try_acquire()))),
    );

    let rt = current_thread();
    c.bench_function("queue uncontended acquire().await+release", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    drop(black_box(q.acquire(Class::PointRead, LONG).await));
                }
                start.elapsed()
            })
        })
    });

    const WAITERS: usize = 64;
    const PERMITS: usize = 4;
    let classes = mixed_classes(WAITERS);
    let woken = Arc::new(Mutex::new(Vec::new()));
    let wakers: Vec<Waker> = (0..WAITERS)
        .map(|index| {
            Waker::from(Arc::new(IndexWaker {
                index,
                woken: Arc::clone(&woken),
            }))
        })
        .collect();
    // The acquire futures arm tokio timers (the timeout), which need a runtime context.
    let _guard = rt.enter();
    let mut g = c.benchmark_group("queue contended");
    g.throughput(Throughput::Elements(WAITERS as u64));
    let modes = [
        ("priority", true, 550, LONG),
        ("priority, no background share", true, 0, LONG),
        ("priority, no timeout", true, 550, Duration::MAX),
        ("fifo", false, 550, LONG),
    ];
    for (label, priority, share, timeout) in modes {
        let q = queue(PERMITS, priority, share);
        let order = contended_cycle(&q, timeout, &classes, &wakers, &woken);
        let served: Vec<Class> = order.iter().map(|&i| classes[i]).collect();
        if !priority {
            assert!(order.windows(2).all(|w| w[0] < w[1]), "FIFO order");
        } else if share == 0 {
            assert!(served.windows(2).all(|w| w[0] <= w[1]), "class order");
        } else if timeout == LONG {
            // Waiters return their permit at once, so read and analytic work is always below
            // its share and goes first; print the order once for the record.
            let names: Vec<&str> = served.iter().map(|c| c.as_str()).collect();
            eprintln!("{label}: grant order of {WAITERS} mixed waiters: {names:?}");
        }
        g.bench_function(
            format!("{WAITERS} mixed waiters through {PERMITS} permits ({label})"),
            |b| b.iter(|| black_box(contended_cycle(&q, timeout, &classes, &wakers, &woken))),
        );
        assert_eq!((q.available(), q.waiting()), (PERMITS, 0));
    }
    g.finish();
}

criterion_group!(benches, framing, classification, routing, permit_queue);
criterion_main!(benches);
