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

pub fn label(s: &str) -> Result<String, String> {
    meshfed_model::validate::check_label("value", s)?;
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
    meshfed_model::validate::check_host_port("value", s)?;
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
    fn durations() {
        assert_eq!(duration("24h").unwrap(), time::Duration::hours(24));
        assert_eq!(duration("1h 30m").unwrap(), time::Duration::minutes(90));
        assert!(duration("0s").unwrap_err().contains("positive"));
        assert!(duration("soon")
            .unwrap_err()
            .contains("\"soon\" is not a duration"));
    }
}
