//! Micro-benchmarks of the per-message work: framing client and server streams,
//! classifying cached and uncached statements, and the routing decision.

use std::hint::black_box;

use bytes::BytesMut;
use causeway::classify::{Classifier, FunctionCatalog, classify};
use causeway::config::{Fallback, ReplicaStrategy};
use causeway::protocol::{self, DEFAULT_MAX_MESSAGE_BYTES};
use causeway::route::{self, Policy, ReplicaView, SessionView};
use criterion::{Criterion, criterion_group, criterion_main};

const OLTP: &[&str] = &[
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
    "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
    "SELECT id, name, email FROM users WHERE id = $1",
];

const ANALYTIC: &str = "SELECT c.region, date_trunc('day', o.created_at) AS day, count(*), sum(o.total) \
     FROM orders o JOIN customers c ON c.id = o.customer_id \
     WHERE o.created_at > now() - interval '30 days' GROUP BY 1, 2 ORDER BY 2 DESC";

fn catalog() -> FunctionCatalog {
    let rows = [
        ("now", 's'),
        ("count", 'i'),
        ("sum", 'i'),
        ("date_trunc", 'i'),
    ];
    FunctionCatalog::from_pg_proc(rows.iter().map(|(n, v)| (n.to_string(), *v)), &[], &[])
}

fn framing(c: &mut Criterion) {
    // A server reply as the relay sees it: RowDescription, 10 DataRows, CommandComplete, RFQ.
    let mut reply = BytesMut::new();
    reply.extend_from_slice(&protocol::row_description_text(&["a", "b"]).bytes);
    for _ in 0..10 {
        reply.extend_from_slice(
            &protocol::data_row_text(&[Some("12345"), Some("hello world")]).bytes,
        );
    }
    reply.extend_from_slice(&protocol::command_complete("SELECT 10").bytes);
    reply.extend_from_slice(&protocol::ready_for_query(protocol::TxStatus::Idle).bytes);
    let reply = reply.freeze();
    c.bench_function("frame server reply (13 messages)", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&reply[..]);
            let mut n = 0;
            while let Ok(Some(f)) = protocol::decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_BYTES) {
                n += f.bytes.len();
            }
            black_box(n)
        })
    });
    let mut batch = BytesMut::new();
    batch.extend_from_slice(&protocol::encode_parse("", OLTP[0], &[0, 0]).bytes);
    batch.extend_from_slice(&protocol::encode_sync().bytes);
    let batch = batch.freeze();
    c.bench_function("frame client Parse+Sync", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&batch[..]);
            while let Ok(Some(f)) = protocol::decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_BYTES) {
                black_box(f);
            }
        })
    });
}

fn classification(c: &mut Criterion) {
    let cat = catalog();
    for (i, sql) in OLTP.iter().enumerate() {
        c.bench_function(&format!("classify uncached oltp#{i}"), |b| {
            b.iter(|| black_box(classify(black_box(sql), &cat)))
        });
    }
    c.bench_function("classify uncached analytic", |b| {
        b.iter(|| black_box(classify(black_box(ANALYTIC), &cat)))
    });
    let cached = Classifier::new(1000, catalog());
    cached.classify(OLTP[0]);
    c.bench_function("classify cache hit", |b| {
        b.iter(|| black_box(cached.classify(black_box(OLTP[0]))))
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

criterion_group!(benches, framing, classification, routing);
criterion_main!(benches);
