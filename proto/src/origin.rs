//! URLs toolmesh is told to trust, read one way by every binary: loopback authorities
//! (what "on this machine" means for a listener, a `Host` or an upstream), and the
//! issuer and resource URLs of gateway mode (a gateway's own flags, and the control
//! plane's `--gateway-issuer`s it sends them).
//!
//! Pure functions: no I/O, no name resolution (`localhost` is taken by its name).

/// Whether `authority` (`host[:port]`, IPv6 in brackets) names loopback: `localhost`
/// (any case), `127.0.0.1` or `[::1]`, with a valid port or none.
pub fn is_loopback_authority(authority: &str) -> bool {
    let host = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, port)) if port.is_empty() || is_port(port) => return host == "::1",
            _ => return false,
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) if is_port(port) => host,
            Some(_) => return false,
            None => authority,
        }
    };
    host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1"
}

fn is_port(text: &str) -> bool {
    text.strip_prefix(':')
        .unwrap_or(text)
        .parse::<u16>()
        .is_ok()
}

/// An issuer or resource URL of gateway mode: https, or http on loopback (for trying
/// it out); a host, no user info, query, fragment, quotes, spaces or controls; and,
/// for `origin_only`, no path. The error names the URL, for the caller to prefix with
/// the flag or field it came from.
pub fn check_gateway_url(url: &str, origin_only: bool) -> Result<(), String> {
    let rest = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(rest), _) => rest,
        (None, Some(rest)) => {
            let authority = rest.split('/').next().unwrap_or_default();
            if !is_loopback_authority(authority) {
                return Err(format!(
                    "{url:?} must be https:// (http:// only on loopback)"
                ));
            }
            rest
        }
        _ => return Err(format!("{url:?} must be an https:// URL")),
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty()
        || authority.contains('@')
        || rest.contains(['?', '#', '"', '\\'])
        || rest.bytes().any(|b| b <= b' ' || b >= 0x7f)
    {
        return Err(format!(
            "{url:?} must be a plain URL (a host; no user info, query, fragment, quotes or spaces)"
        ));
    }
    if origin_only && !path.is_empty() {
        return Err(format!(
            "{url:?} must be an origin (scheme://host[:port]), without a path"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_authorities() {
        for ok in [
            "127.0.0.1:16001",
            "localhost",
            "LOCALHOST:80",
            "[::1]",
            "[::1]:9",
        ] {
            assert!(is_loopback_authority(ok), "{ok}");
        }
        for bad in [
            "evil.example.com:16001",
            "127.0.0.2",
            "[::2]",
            "localhost:x",
            "127.0.0.1:99999",
            "",
        ] {
            assert!(!is_loopback_authority(bad), "{bad}");
        }
    }

    #[test]
    fn gateway_urls() {
        assert!(check_gateway_url("https://idp.example.com/realms/a", false).is_ok());
        assert!(check_gateway_url("http://localhost:8080", true).is_ok());
        for bad in [
            "http://idp.example.com",
            "ftp://idp.example.com",
            "https://",
            "https://user@idp.example.com",
            "https://idp.example.com?x=1",
            "https://idp.example.com#f",
            "https://idp.example.com/a b",
            "https://idp.example.com/\"quoted",
        ] {
            assert!(check_gateway_url(bad, false).is_err(), "{bad}");
        }
        assert!(check_gateway_url("https://mcp.example.com/mcp", true).is_err());
    }
}
