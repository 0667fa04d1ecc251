//! A client's byte stream: the startup phase (SSLRequest/GSSENCRequest retries, CancelRequest,
//! StartupMessage) as `server::handle_client` drives it, then regular frontend messages framed with
//! the server's limit and handed to every client-message parser the session and auth code use.
#![no_main]

use causeway::protocol::{self, Frame, StartupMessage, tag};
use causeway_fuzz::{
    Event, Feed, check_batch_decoders, client_max_message, next_startup, run_frames, split_input,
};
use libfuzzer_sys::fuzz_target;

/// Replays the stream with reads of `chunk` bytes, following `server::handle_client`: answer
/// SSL/GSSENC requests and read again, stop after a CancelRequest, frame after a StartupMessage.
/// Returns the decoded events and the raw bytes that followed the startup packet.
fn replay(stream: &[u8], chunk: usize, max: usize) -> (Vec<Event>, Vec<u8>) {
    let mut feed = Feed::new(stream, chunk);
    let mut events = Vec::new();
    loop {
        match next_startup(&mut feed, max) {
            Ok(Some((msg, packet))) => {
                let next = match msg {
                    StartupMessage::SslRequest | StartupMessage::GssEncRequest => Next::Retry,
                    StartupMessage::Cancel { .. } => Next::Close,
                    StartupMessage::Startup { .. } => Next::Frames,
                };
                events.push(Event::Startup(msg, packet));
                match next {
                    Next::Retry => {}
                    Next::Close => return (events, Vec::new()),
                    Next::Frames => break,
                }
            }
            Ok(None) => {
                if !feed.fill() {
                    feed.check_buffer();
                    events.push(Event::End(feed.buf.len()));
                    return (events, Vec::new());
                }
            }
            Err(e) => {
                feed.check_buffer();
                events.push(Event::Error(e));
                return (events, Vec::new());
            }
        }
    }
    let post_startup = [&feed.buf[..], feed.unread()].concat();
    run_frames(&mut feed, max, &mut events);
    (events, post_startup)
}

/// What the proxy does after a decoded startup-family packet.
enum Next {
    Retry,
    Close,
    Frames,
}

/// Every client parser runs on every body (a hostile client picks tags freely); on success the
/// matching encoder must rebuild the body byte for byte, since the proxy re-encodes what it parses.
fn check_parsers(f: &Frame) {
    let body = f.body();
    if let Ok(q) = protocol::parse_query(body) {
        assert_eq!(protocol::encode_query(q.sql).body(), body);
    }
    if let Ok(p) = protocol::parse_parse(body) {
        assert_eq!(p.param_types.len(), 2 + 4 * p.param_type_count());
        assert_eq!(
            protocol::encode_parse(p.name, p.sql, p.param_types).body(),
            body
        );
    }
    if let Ok(b) = protocol::parse_bind(body) {
        assert_eq!(protocol::encode_bind_renamed(&b, b.statement).body(), body);
        // The proxy renames statements on the way to the backend; the rest must survive intact.
        let renamed = protocol::encode_bind_renamed(&b, "causeway_s1");
        let again = protocol::parse_bind(renamed.body()).expect("renamed Bind must parse");
        assert_eq!(
            (again.portal, again.statement, again.rest),
            (b.portal, "causeway_s1", b.rest)
        );
    }
    if let Ok(d) = protocol::parse_describe(body) {
        assert!(matches!(d.kind, b'S' | b'P'));
        assert_eq!(protocol::encode_describe(d.kind, d.name).body(), body);
    }
    if let Ok(c) = protocol::parse_close(body) {
        assert!(matches!(c.kind, b'S' | b'P'));
        assert_eq!(protocol::encode_close(c.kind, c.name).body(), body);
    }
    if let Ok(e) = protocol::parse_execute(body) {
        assert_eq!(protocol::encode_execute(e.portal, e.max_rows).body(), body);
    }
    if let Ok(pw) = protocol::parse_password(body) {
        assert_eq!(protocol::encode_password(pw.as_bytes()).body(), body);
    }
    if let Ok((mechanism, data)) = protocol::parse_sasl_initial(body) {
        assert!(data.len() <= body.len());
        let again = protocol::encode_sasl_initial(mechanism, data);
        assert_eq!(
            protocol::parse_sasl_initial(again.body()),
            Ok((mechanism, data))
        );
    }
    // Tags the session dispatches on must still frame cleanly when re-encoded bodiless.
    if matches!(f.tag, tag::FE_SYNC | tag::FE_FLUSH | tag::FE_TERMINATE) && body.is_empty() {
        assert_eq!(&Frame::new(f.tag, &[]), f);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((chunk, stream)) = split_input(data) else {
        return;
    };
    let max = client_max_message();
    let (events, post_startup) = replay(stream, chunk, max);
    // TCP may split the stream anywhere: one big read must decode to exactly the same events.
    if chunk != usize::MAX {
        let (whole, _) = replay(stream, usize::MAX, max);
        assert_eq!(
            events, whole,
            "decoding depends on how reads split the stream"
        );
    }
    for e in &events {
        if let Event::Frame(f) = e {
            check_parsers(f);
        }
    }
    check_batch_decoders(&post_startup, max);
});
