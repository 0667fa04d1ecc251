//! Writes the seed corpora in `seeds/<target>/` with the proxy's own encoders, so every seed is a
//! valid stream. The files are small and checked in; regenerate them from `fuzz/` with
//! `cargo run --example make_seeds`.

use std::path::Path;

use causeway::protocol::{self, Frame, TxStatus};

/// One seed: control byte (read size, 0 = one read) followed by the concatenated stream.
fn seed(ctl: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut v = vec![ctl];
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

fn cat(frames: &[Frame]) -> Vec<u8> {
    frames.iter().flat_map(|f| f.bytes.to_vec()).collect()
}

fn client_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ssl = [
        &8i32.to_be_bytes()[..],
        &protocol::SSL_REQUEST_CODE.to_be_bytes(),
    ]
    .concat();
    let gss = [
        &8i32.to_be_bytes()[..],
        &protocol::GSSENC_REQUEST_CODE.to_be_bytes(),
    ]
    .concat();
    let startup = protocol::encode_startup(&[
        ("user", "alice"),
        ("database", "app"),
        ("application_name", "fuzz"),
        ("options", "-c statement_timeout=5s"),
    ]);
    let mut minor2 = protocol::encode_startup(&[("user", "bob"), ("_pq_.x", "1")]).to_vec();
    minor2[7] = 2;
    let mut types = vec![0, 1];
    types.extend_from_slice(&23i32.to_be_bytes());
    let simple = cat(&[
        protocol::encode_query("select 1; insert into t values (1)"),
        protocol::encode_terminate(),
    ]);
    let extended = cat(&[
        protocol::encode_parse("s1", "select * from t where id = $1", &types),
        protocol::encode_bind("p1", "s1", &[1], &[Some(&7i32.to_be_bytes())], &[0]),
        protocol::encode_describe(b'P', "p1"),
        protocol::encode_execute("p1", 10),
        protocol::encode_bind("", "s1", &[], &[None], &[]),
        protocol::encode_execute("", 0),
        protocol::encode_close(b'S', "s1"),
        protocol::encode_flush(),
        protocol::encode_sync(),
        Frame::new(protocol::tag::FE_COPY_DATA, b"1\tx\n"),
        Frame::new(protocol::tag::FE_COPY_DONE, b""),
    ]);
    let auth = cat(&[
        protocol::encode_password(b"md5d41d8cd98f00b204e9800998ecf8427e"),
        protocol::encode_sasl_initial("SCRAM-SHA-256", b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"),
        protocol::encode_sasl_response(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        ),
    ]);
    vec![
        ("ssl_startup_simple", seed(0, &[&ssl, &startup, &simple])),
        ("gss_minor2_auth", seed(3, &[&gss, &minor2, &auth])),
        ("startup_extended", seed(1, &[&startup, &extended])),
        ("startup_extended_whole", seed(0, &[&startup, &extended])),
        (
            "cancel",
            seed(0, &[&protocol::encode_cancel_request(4242, -17)]),
        ),
    ]
}

fn backend_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let login = cat(&[
        protocol::auth_sasl(&["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]),
        protocol::auth_sasl_continue(b"r=abc,s=c2FsdA==,i=4096"),
        protocol::auth_sasl_final(b"v=c2ln"),
        protocol::auth_ok(),
        protocol::parameter_status("server_version", "17.2"),
        protocol::parameter_status("TimeZone", "UTC"),
        protocol::backend_key_data(1234, -99),
        protocol::ready_for_query(TxStatus::Idle),
    ]);
    let results = cat(&[
        protocol::row_description_text(&["id", "name"]),
        protocol::data_row_text(&[Some("1"), None]),
        protocol::command_complete("SELECT 1"),
        protocol::ready_for_query(TxStatus::InTransaction),
        protocol::notice_response("01000", "careful"),
        protocol::error_response("ERROR", "23505", "duplicate key value"),
        protocol::ready_for_query(TxStatus::Failed),
    ]);
    let misc = cat(&[
        protocol::auth_md5([1, 2, 3, 4]),
        protocol::auth_cleartext(),
        protocol::negotiate_protocol_version(0, &["_pq_.x"]),
        protocol::parse_complete(),
        protocol::bind_complete(),
        protocol::no_data(),
        protocol::close_complete(),
        protocol::empty_query_response(),
        Frame::new(protocol::tag::BE_AUTHENTICATION, &7i32.to_be_bytes()),
    ]);
    vec![
        ("login", seed(0, &[&login])),
        ("results_split", seed(7, &[&results])),
        ("misc", seed(0, &[&misc])),
    ]
}

fn main() -> std::io::Result<()> {
    let root = std::env::args().nth(1).unwrap_or_else(|| "seeds".into());
    for (target, seeds) in [
        ("client_stream", client_seeds()),
        ("backend_stream", backend_seeds()),
    ] {
        let dir = Path::new(&root).join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
    }
    Ok(())
}
