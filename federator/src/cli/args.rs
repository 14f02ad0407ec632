//! Argument parsers shared by subcommands; each error names the value and what was expected.

use trust::{SpiffeId, TrustDomain};

/// A duration such as `24h`, `15m`, `90s` or `1h 30m`.
pub fn duration(s: &str) -> Result<time::Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 24h, 15m, 90s"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: the duration must be positive"));
    }
    time::Duration::try_from(d).map_err(|_| format!("{s:?} is too long"))
}

/// A duration, or `off` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaybeDuration(pub Option<time::Duration>);

pub fn duration_or_off(s: &str) -> Result<MaybeDuration, String> {
    if s == "off" {
        return Ok(MaybeDuration(None));
    }
    duration(s).map(|d| MaybeDuration(Some(d)))
}

pub fn trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

pub fn spiffe_id(s: &str) -> Result<SpiffeId, String> {
    SpiffeId::new(s).map_err(|e| e.to_string())
}

/// A duration for std APIs (timeouts, intervals).
pub fn std_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 30s, 500ms, 1m"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: the duration must be positive"));
    }
    Ok(d)
}

/// `IP:PORT`, or `off` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<std::net::SocketAddr>);

pub fn listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    socket_addr(s).map(|a| Listen(Some(a)))
}

/// `IP:PORT` (an address to bind).
pub fn socket_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not IP:PORT (e.g. 127.0.0.1:15014 or [::]:15010)"))
}

/// A DNS upstream: `IP` (port 53) or `IP:PORT`.
pub fn dns_upstream(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.trim_matches(['[', ']'])
        .parse::<std::net::IpAddr>()
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not IP or IP:PORT"))
}

/// The xDS debounce window: positive, at most 1 s.
pub fn debounce(s: &str) -> Result<std::time::Duration, String> {
    let d = std_duration(s)?;
    if d > std::time::Duration::from_secs(1) {
        return Err(format!("{s:?} is more than 1s"));
    }
    Ok(d)
}

/// An IPv6 range, or `off` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V6Range(pub Option<ipnet::Ipv6Net>);

pub fn v6_range(s: &str) -> Result<V6Range, String> {
    if s == "off" {
        return Ok(V6Range(None));
    }
    meshfed_dns::vips::parse_v6(s).map(|r| V6Range(Some(r)))
}

pub fn label(s: &str) -> Result<String, String> {
    meshfed_model::validate::check_label("value", s).map_err(|e| e.reason)?;
    Ok(s.to_string())
}

pub fn locality(s: &str) -> Result<proto::Locality, String> {
    let l = meshfed_model::validate::parse_locality(s)?;
    if l.region.is_empty() {
        return Err(format!("locality {s:?} needs at least a region"));
    }
    Ok(l)
}

pub fn host_port(s: &str) -> Result<String, String> {
    meshfed_model::validate::check_host_port("value", s).map_err(|e| e.reason)?;
    Ok(s.to_string())
}

/// RFC 3339 for Unix seconds.
pub fn rfc3339_unix(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .map(rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// RFC 3339 time for people and scripts.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_debounce_and_ranges() {
        assert_eq!(listen("off").unwrap(), Listen(None));
        assert_eq!(listen("127.0.0.1:15010").unwrap().0.unwrap().port(), 15010);
        assert!(listen("localhost:15010")
            .unwrap_err()
            .contains("is not IP:PORT"));
        assert_eq!(dns_upstream("10.0.0.2").unwrap().port(), 53);
        assert_eq!(dns_upstream("[::1]:5353").unwrap().port(), 5353);
        assert!(dns_upstream("resolver").is_err());
        assert!(debounce("2s").unwrap_err().contains("more than 1s"));
        assert_eq!(
            debounce("250ms").unwrap(),
            std::time::Duration::from_millis(250)
        );
        assert_eq!(v6_range("off").unwrap(), V6Range(None));
    }

    #[test]
    fn durations() {
        assert_eq!(duration("24h").unwrap(), time::Duration::hours(24));
        assert_eq!(duration("1h 30m").unwrap(), time::Duration::minutes(90));
        assert!(duration("0s").unwrap_err().contains("positive"));
        assert!(duration("soon")
            .unwrap_err()
            .contains("\"soon\" is not a duration"));
    }
}
