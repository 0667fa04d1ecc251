//! A backend's byte stream: framed with the pool's limit for backend connections, then every
//! backend-message parser the relay, pool and auth code use runs on each body.
#![no_main]

use causeway::protocol::{self, AuthRequest, Frame, TxStatus};
use causeway_fuzz::{
    Event, Feed, backend_max_message, check_batch_decoders, run_frames, split_input,
};
use libfuzzer_sys::fuzz_target;

/// Replays the stream with reads of `chunk` bytes; returns what the proxy would have decoded.
fn replay(stream: &[u8], chunk: usize, max: usize) -> Vec<Event> {
    let mut feed = Feed::new(stream, chunk);
    let mut events = Vec::new();
    run_frames(&mut feed, max, &mut events);
    events
}

/// Every backend parser runs on every body; on success the proxy's own encoder for that message
/// must rebuild the body (or, for lossily decoded text, survive a second round trip).
fn check_parsers(f: &Frame) {
    let body = f.body();
    if let Ok(s) = protocol::parse_ready_for_query(body) {
        assert_eq!(TxStatus::from_byte(s.as_byte()), Some(s));
        assert_eq!(protocol::ready_for_query(s).body(), body);
    }
    if let Ok(e) = protocol::parse_error_fields(body) {
        let sum = e.severity.len() + e.code.len() + e.message.len();
        // Lossy decoding can triple a byte (U+FFFD), never more; this bounds the copying.
        assert!(sum <= 3 * body.len());
        let rebuilt = protocol::error_response(&e.severity, &e.code, &e.message);
        let again = protocol::parse_error_fields(rebuilt.body()).expect("rebuilt error must parse");
        assert_eq!(
            (again.severity, again.code, again.message),
            (e.severity, e.code, e.message)
        );
    }
    if let Ok(t) = protocol::parse_command_complete(body) {
        assert_eq!(protocol::command_complete(t).body(), body);
    }
    if let Ok((name, value)) = protocol::parse_parameter_status(body) {
        assert_eq!(protocol::parameter_status(name, value).body(), body);
    }
    if let Ok((pid, secret)) = protocol::parse_backend_key_data(body) {
        assert_eq!(protocol::backend_key_data(pid, secret).body(), body);
    }
    if let Ok(req) = protocol::parse_authentication(body) {
        let rebuilt = match &req {
            AuthRequest::Ok => protocol::auth_ok(),
            AuthRequest::CleartextPassword => protocol::auth_cleartext(),
            AuthRequest::Md5 { salt } => protocol::auth_md5(*salt),
            AuthRequest::Sasl { mechanisms } => {
                assert!(mechanisms.iter().all(|m| !m.is_empty()));
                protocol::auth_sasl(mechanisms)
            }
            AuthRequest::SaslContinue(d) => protocol::auth_sasl_continue(d),
            AuthRequest::SaslFinal(d) => protocol::auth_sasl_final(d),
            AuthRequest::Unsupported(code) => {
                assert!(!matches!(code, 0 | 3 | 5 | 10 | 11 | 12));
                assert_eq!(&body[..4], &code.to_be_bytes());
                return;
            }
        };
        assert_eq!(rebuilt.body(), body);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((chunk, stream)) = split_input(data) else {
        return;
    };
    let max = backend_max_message();
    let events = replay(stream, chunk, max);
    // TCP may split the stream anywhere: one big read must decode to exactly the same events.
    if chunk != usize::MAX {
        assert_eq!(
            events,
            replay(stream, usize::MAX, max),
            "decoding depends on read sizes"
        );
    }
    for e in &events {
        if let Event::Frame(f) = e {
            check_parsers(f);
        }
    }
    check_batch_decoders(stream, max);
});
