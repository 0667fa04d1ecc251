//! Keeps a web browser from being turned against the admin endpoint. Without a token the
//! endpoint trusts whoever can reach its loopback address, and the operator's browser can: a
//! page may send a "simple" cross-origin POST (no preflight), and a DNS-rebound page reaches
//! the endpoint under the attacker's host name. Both leave marks a browser cannot hide: the
//! `Origin` and `Sec-Fetch-Site` headers, and the `Host` the page was loaded from.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::uri::Authority;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AdminState;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request names a host other than this endpoint: a DNS-rebound page.
    ForeignHost,
    /// A state-changing request sent by a page of another origin.
    CrossOrigin,
}

/// What the checks look at, taken from one request.
#[derive(Debug, Default)]
pub struct Seen<'a> {
    /// Whether the method may change state (anything but GET, HEAD and OPTIONS).
    pub changes_state: bool,
    /// The `Host` header.
    pub host: Option<&'a str>,
    /// The authority of an absolute-form request target.
    pub target_authority: Option<&'a str>,
    /// The `Origin` header.
    pub origin: Option<&'a str>,
    /// The `Sec-Fetch-Site` header.
    pub fetch_site: Option<&'a str>,
}

/// Decides whether a request is served; `listen` is the endpoint's own address.
pub fn check(seen: &Seen, listen: IpAddr, token_set: bool) -> Result<(), Refusal> {
    // With a token every request is authenticated, and a proxy in front may name any host.
    if !token_set
        && [seen.host, seen.target_authority]
            .into_iter()
            .flatten()
            .any(|h| !names_this_endpoint(h, listen))
    {
        return Err(Refusal::ForeignHost);
    }
    if !seen.changes_state {
        return Ok(());
    }
    // "same-origin" is the dashboard's own page, "none" the operator's own navigation.
    // "same-site" covers other ports of 127.0.0.1, that is, other local web apps.
    if seen
        .fetch_site
        .is_some_and(|s| !s.eq_ignore_ascii_case("same-origin") && !s.eq_ignore_ascii_case("none"))
    {
        return Err(Refusal::CrossOrigin);
    }
    // No Origin: curl, scripts, monitoring. A browser always sends one with a POST.
    let Some(origin) = seen.origin else {
        return Ok(());
    };
    let Some(host) = seen.host.or(seen.target_authority) else {
        return Err(Refusal::CrossOrigin);
    };
    let same = ["http://", "https://"].iter().any(|scheme| {
        origin
            .strip_prefix(scheme)
            .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
    });
    if same {
        Ok(())
    } else {
        Err(Refusal::CrossOrigin)
    }
}

/// Whether an authority (`host[:port]`) names a loopback address, `localhost` or `listen`.
fn names_this_endpoint(authority: &str, listen: IpAddr) -> bool {
    let Ok(parsed) = authority.parse::<Authority>() else {
        return false;
    };
    // Userinfo has no place in a Host header; a request carrying it is not a browser's.
    if parsed.as_str().contains('@') {
        return false;
    }
    let host = parsed.host();
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback() || ip == listen)
}

/// Middleware over every route: refuses what [`check`] refuses with 403.
pub(super) async fn refuse_browser_attacks(
    State(state): State<Arc<AdminState>>,
    req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let token_set = !state.shared.cfg.load().admin.token.is_empty();
    let seen = Seen {
        changes_state: ![Method::GET, Method::HEAD, Method::OPTIONS].contains(req.method()),
        host: text(header::HOST.as_str()),
        target_authority: req.uri().authority().map(Authority::as_str),
        origin: text(header::ORIGIN.as_str()),
        fetch_site: text("sec-fetch-site"),
    };
    match check(&seen, state.listen.ip(), token_set) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            tracing::warn!(
                ?refusal,
                method = %req.method(),
                path = req.uri().path(),
                host = seen.host,
                origin = seen.origin,
                "admin request refused"
            );
            let why = match refusal {
                Refusal::ForeignHost => "this endpoint answers only to its own address\n",
                Refusal::CrossOrigin => "cross-origin request refused\n",
            };
            (StatusCode::FORBIDDEN, why).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTEN: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));

    fn get(host: &str) -> Seen<'_> {
        Seen {
            host: Some(host),
            ..Seen::default()
        }
    }

    fn post<'a>(host: &'a str, origin: Option<&'a str>, fetch_site: Option<&'a str>) -> Seen<'a> {
        Seen {
            changes_state: true,
            host: Some(host),
            origin,
            fetch_site,
            ..Seen::default()
        }
    }

    #[test]
    fn hosts() {
        let cases: &[(&str, IpAddr, bool)] = &[
            ("127.0.0.1:9930", LISTEN, true),
            ("127.0.0.1", LISTEN, true),
            ("127.8.9.10:9930", LISTEN, true),
            ("localhost:9930", LISTEN, true),
            ("LocalHost", LISTEN, true),
            ("[::1]:9930", LISTEN, true),
            ("10.1.2.3:9930", "10.1.2.3".parse().unwrap(), true),
            ("[fd00::5]:9930", "fd00::5".parse().unwrap(), true),
            ("attacker.example", LISTEN, false),
            ("attacker.example:9930", LISTEN, false),
            ("localhost.attacker.example:9930", LISTEN, false),
            ("127.0.0.1.nip.io:9930", LISTEN, false),
            ("localhost.:9930", LISTEN, false),
            ("10.1.2.3:9930", LISTEN, false),
            ("[::ffff:7f00:1]:9930", LISTEN, false),
            ("evil@127.0.0.1:9930", LISTEN, false),
            ("", LISTEN, false),
            ("127.0.0.1:9930 x", LISTEN, false),
        ];
        for &(host, listen, served) in cases {
            assert_eq!(
                check(&get(host), listen, false).is_ok(),
                served,
                "Host: {host:?} (listening on {listen})"
            );
        }
    }

    #[test]
    fn a_token_lets_any_host_in() {
        assert_eq!(check(&get("admin.example.com"), LISTEN, true), Ok(()));
        assert_eq!(
            check(&get("attacker.example"), LISTEN, false),
            Err(Refusal::ForeignHost)
        );
    }

    #[test]
    fn an_absolute_target_is_checked_like_the_host() {
        let seen = Seen {
            host: Some("127.0.0.1:9930"),
            target_authority: Some("attacker.example"),
            ..Seen::default()
        };
        assert_eq!(check(&seen, LISTEN, false), Err(Refusal::ForeignHost));
        // No Host at all (HTTP/1.0 tools) is no browser.
        assert_eq!(check(&Seen::default(), LISTEN, false), Ok(()));
    }

    #[test]
    fn state_changes_from_other_origins() {
        let h = "127.0.0.1:9930";
        let cases: &[(Option<&str>, Option<&str>, bool)] = &[
            (None, None, true),
            (Some("http://127.0.0.1:9930"), None, true),
            (Some("http://127.0.0.1:9930"), Some("same-origin"), true),
            (Some("https://127.0.0.1:9930"), None, true),
            (None, Some("none"), true),
            (Some("http://attacker.example"), None, false),
            (Some("http://attacker.example"), Some("cross-site"), false),
            (None, Some("cross-site"), false),
            (None, Some("same-site"), false),
            (Some("http://127.0.0.1:9930"), Some("cross-site"), false),
            (Some("http://127.0.0.1:8080"), None, false),
            (Some("http://localhost:9930"), None, false),
            (Some("http://127.0.0.1:9930.attacker.example"), None, false),
            (Some("null"), None, false),
            (Some(""), None, false),
        ];
        for &(origin, fetch_site, served) in cases {
            assert_eq!(
                check(&post(h, origin, fetch_site), LISTEN, false).is_ok(),
                served,
                "POST from Origin {origin:?}, Sec-Fetch-Site {fetch_site:?}"
            );
            // A token does not lift the origin check.
            assert_eq!(
                check(&post(h, origin, fetch_site), LISTEN, true).is_ok(),
                served
            );
        }
    }

    #[test]
    fn reads_are_not_origin_checked() {
        let seen = Seen {
            origin: Some("http://attacker.example"),
            fetch_site: Some("cross-site"),
            ..get("127.0.0.1:9930")
        };
        assert_eq!(check(&seen, LISTEN, false), Ok(()));
    }
}
