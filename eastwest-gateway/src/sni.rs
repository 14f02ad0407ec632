//! The SNI names an east-west gateway routes on.

/// Where a connection should go, from its SNI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    /// `None` for a plain host name (proxyless gRPC sends the service host as SNI).
    pub port: Option<u16>,
    /// Empty when no subset is named.
    pub subset: String,
}

fn host_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Parses `outbound_.<port>_.<subset>_.<host>`, `outbound|<port>|<subset>|<host>` or a plain
/// host name. Case-insensitive, as DNS names are; a trailing dot is ignored.
pub fn parse(sni: &str) -> Result<Target, String> {
    let s = sni.trim_end_matches('.').to_ascii_lowercase();
    let (port, subset, host) = if let Some(rest) = s.strip_prefix("outbound_.") {
        let (port, rest) = rest
            .split_once("_.")
            .ok_or_else(|| format!("{sni:?}: expected outbound_.<port>_.<subset>_.<host>"))?;
        let (subset, host) = rest
            .split_once("_.")
            .ok_or_else(|| format!("{sni:?}: expected outbound_.<port>_.<subset>_.<host>"))?;
        (Some(port), subset, host)
    } else if let Some(rest) = s.strip_prefix("outbound|") {
        let mut it = rest.splitn(3, '|');
        match (it.next(), it.next(), it.next()) {
            (Some(p), Some(sub), Some(h)) => (Some(p), sub, h),
            _ => return Err(format!("{sni:?}: expected outbound|<port>|<subset>|<host>")),
        }
    } else {
        (None, "", s.as_str())
    };
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{sni:?}: {p:?} is not a port"))?,
        ),
        None => None,
    };
    // Istio writes an absent subset as "_" in the dotted form and as "" in the pipe form.
    let subset = if subset == "_" { "" } else { subset };
    if !subset.is_empty() && !host_ok(subset) {
        return Err(format!("{sni:?}: {subset:?} is not a subset name"));
    }
    if !host_ok(host) {
        return Err(format!("{sni:?}: {host:?} is not a host name"));
    }
    Ok(Target {
        host: host.to_string(),
        port,
        subset: subset.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_forms_and_plain_hosts() {
        let t = parse("outbound_.9080_._.reviews.shop.svc.cluster.local").unwrap();
        assert_eq!(
            t,
            Target {
                host: "reviews.shop.svc.cluster.local".into(),
                port: Some(9080),
                subset: String::new()
            }
        );
        let t = parse("outbound|9080|v2|reviews.shop.svc.cluster.local").unwrap();
        assert_eq!((t.port, t.subset.as_str()), (Some(9080), "v2"));
        let t = parse("outbound_.8080_.v1_.Payment.Shop.svc.cluster.local.").unwrap();
        assert_eq!(
            (t.host.as_str(), t.subset.as_str()),
            ("payment.shop.svc.cluster.local", "v1")
        );
        assert_eq!(parse("payment.shop.svc.cluster.local").unwrap().port, None);
    }

    #[test]
    fn malformed_names_are_refused_with_the_reason() {
        for (bad, why) in [
            ("outbound_.x_._.a.b", "is not a port"),
            ("outbound_.0_._.a.b", "is not a port"),
            ("outbound_.70000_._.a.b", "is not a port"),
            ("outbound_.80_.a.b", "expected"),
            ("outbound|80|a", "expected"),
            ("outbound_.80_._.", "expected"),
            ("outbound_.80_._.-x.y", "is not a host"),
            ("a..b", "is not a host"),
            ("-a.b", "is not a host"),
            ("outbound_.80_.v/1_.a.b", "is not a subset"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
