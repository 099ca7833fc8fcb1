//! Phone normalization and Avro encode/decode: the per-record CPU costs every
//! stage pays. `cargo bench --bench codec`.

use std::collections::BTreeMap;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ese::codec::Codec;
use ese::model::{Channel, SendKind};
use ese::phone::Normalizer;
use ese::records::{Record, SendRequest};
use ese::stages::users::UserUpsert;
use serde_json::json;

fn phones(c: &mut Criterion) {
    let n = Normalizer::new("US");
    let inputs = [
        "+14155552671",
        "(415) 555-2671",
        "whatsapp:+447700900123",
        "0044 20 7946 0958",
    ];
    let mut g = c.benchmark_group("phone");
    g.throughput(Throughput::Elements(inputs.len() as u64));
    // Numbers seen before come from the normalizer's cache.
    g.bench_function("normalize_4_forms_seen", |b| {
        b.iter(|| {
            for i in inputs {
                let _ = std::hint::black_box(n.address(std::hint::black_box(i)));
            }
        })
    });
    // Numbers never seen are parsed (and cached).
    let mut next = 0u64;
    g.bench_function("normalize_4_new_numbers", |b| {
        b.iter(|| {
            for _ in 0..4 {
                next += 1;
                let input = format!(
                    "+1415{:03}{:04}",
                    200 + (next / 10_000) % 800,
                    next % 10_000
                );
                let _ = std::hint::black_box(n.address(&input));
            }
        })
    });
    g.finish();
}

fn avro(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let codec = Codec::single_object().expect("codec");
    let attributes: BTreeMap<String, serde_json::Value> = [
        ("name", json!("Ada Lovelace")),
        ("city", json!("London")),
        ("age", json!(36)),
        ("vip", json!(true)),
        ("score", json!(9.5)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let u = UserUpsert {
        consent: None,
        event_id: Some("0190f5a2-7c1e-7000-8000-000000000001".into()),
        phone: "+14155552671".into(),
        attributes,
        occurred_at: 1_700_000_000_000,
    };
    encode_decode(c, &rt, &codec, "avro_user_upsert", "users.upserts", &u);

    // A send record: its ids are a union (`["string", "long"]`, schema v2),
    // which goes through apache-avro's `Value` rather than serde directly.
    let send = SendRequest {
        message_id: uuid::Uuid::now_v7(),
        campaign_id: Some(uuid::Uuid::now_v7()),
        recipient: "+14155552671".into(),
        channel: Channel::Sms,
        body: "Hi Ada, your order shipped.".into(),
        attempt: 1,
        kind: SendKind::Campaign,
        not_before: None,
    };
    encode_decode(c, &rt, &codec, "avro_send_request", "messages.send", &send);
}

/// Criterion group `group`: one `item` encoded for `topic`, and decoded.
fn encode_decode<R: Record>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    codec: &Codec,
    group: &str,
    topic: &str,
    item: &R,
) {
    let bytes = rt.block_on(codec.encode(topic, item)).expect("encodes");
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| {
        b.iter(|| rt.block_on(codec.encode(topic, std::hint::black_box(item))))
    });
    g.bench_function("decode", |b| {
        b.iter(|| rt.block_on(codec.decode::<R>(std::hint::black_box(&bytes))))
    });
    g.finish();
}

criterion_group!(benches, phones, avro);
criterion_main!(benches);
