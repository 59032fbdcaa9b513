//! An approval webhook's URL (`approvals.notify[].url`): checked when the
//! policy is parsed, and parsed again by the approvals' notifier when it
//! sends.

/// An `http://host[:port][/path]` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl HttpUrl {
    /// # Errors
    /// When the text is not a plain `http://` URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            "only http:// URLs are supported (send https through a local relay)".to_owned()
        })?;
        if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("the URL contains whitespace or control characters".into());
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err("credentials in the URL are not supported (use headers)".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("bad port {p:?}"))?,
                None if after.is_empty() => 80,
                None => return Err("junk after the host".into()),
            };
            (format!("[{h}]"), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().map_err(|_| format!("bad port {p:?}"))?,
                ),
                None => (authority.to_owned(), 80),
            }
        };
        if host.is_empty() || host == "[]" {
            return Err("no host".into());
        }
        if port == 0 {
            return Err("port 0".into());
        }
        Ok(Self { host, port, path })
    }
}

#[cfg(test)]
mod tests {
    use super::HttpUrl;

    #[test]
    fn parses_http_urls() {
        let u = HttpUrl::parse("http://127.0.0.1:8080/hook?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/hook?x=1")
        );
        let u = HttpUrl::parse("http://example.com").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u = HttpUrl::parse("http://[::1]:9/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 9));
        for bad in [
            "https://x/",
            "http://",
            "http://a b/",
            "http://x:0/",
            "http://x:y/",
            "http://u:p@x/",
            "http://x/\r\nEvil: 1",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
