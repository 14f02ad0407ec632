//! SPIFFE IDs and trust domains, parsed and validated exactly as the SPIFFE ID standard
//! requires (`spiffe://<trust-domain>/<path>`).

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID meshfed accepts, in bytes (the standard's interoperability bound).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a SPIFFE ID or trust domain was refused. Each variant names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("is empty")]
    Empty,
    #[error("must start with \"spiffe://\" (scheme is case-sensitive)")]
    WrongScheme,
    #[error("is {0} bytes long; at most {MAX_SPIFFE_ID_LEN} are allowed")]
    TooLong(usize),
    #[error("has an empty trust domain")]
    EmptyTrustDomain,
    #[error("trust domain is {0} bytes long; at most {MAX_TRUST_DOMAIN_LEN} are allowed")]
    TrustDomainTooLong(usize),
    #[error("trust domain has {what} at byte {pos}")]
    BadTrustDomainChar { what: String, pos: usize },
    #[error("path has {what} at byte {pos}")]
    BadPathChar { what: String, pos: usize },
    #[error("path has an empty segment at byte {0}")]
    EmptySegment(usize),
    #[error("path has a \"{seg}\" segment at byte {pos}")]
    DotSegment { seg: String, pos: usize },
    #[error("path ends with \"/\"")]
    TrailingSlash,
}

/// A parse failure together with the input that caused it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {input:?}: {reason}")]
pub struct ParseIdError {
    pub kind: &'static str,
    pub input: String,
    pub reason: IdError,
}

fn describe(c: char) -> String {
    match c {
        ':' => "':' (ports and userinfo are not allowed)".into(),
        '@' => "'@' (userinfo is not allowed)".into(),
        '?' => "'?' (query strings are not allowed)".into(),
        '#' => "'#' (fragments are not allowed)".into(),
        '%' => "'%' (percent-encoding is not allowed)".into(),
        c if c.is_ascii_uppercase() => format!("uppercase '{c}' (trust domains are lowercase)"),
        c if c.is_control() || c.is_whitespace() => format!("the character {c:?}"),
        c => format!("the character '{c}'"),
    }
}

fn truncate_for_error(s: &str) -> String {
    if s.len() <= 128 {
        return s.to_string();
    }
    let mut end = 128;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A SPIFFE trust domain name such as `east.mesh`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`east.mesh`), or the trust domain's own SPIFFE ID
    /// (`spiffe://east.mesh`).
    pub fn new(input: &str) -> Result<Self, ParseIdError> {
        let err = |reason| ParseIdError {
            kind: "trust domain",
            input: truncate_for_error(input),
            reason,
        };
        let name = input.strip_prefix(SCHEME).unwrap_or(input);
        validate_trust_domain(name, input.len() - name.len()).map_err(err)?;
        Ok(TrustDomain(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<td>` (what a signing certificate may carry).
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

fn validate_trust_domain(name: &str, offset: usize) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong(name.len()));
    }
    for (i, c) in name.char_indices() {
        let ok = c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_');
        if !ok {
            return Err(IdError::BadTrustDomainChar {
                what: describe(c),
                pos: offset + i,
            });
        }
    }
    Ok(())
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

/// A validated SPIFFE ID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: String,
    /// Byte offset where the path starts in `full` (== full.len() when there is no path).
    path_start: usize,
}

impl SpiffeId {
    pub fn new(input: &str) -> Result<Self, ParseIdError> {
        let err = |reason| ParseIdError {
            kind: "SPIFFE ID",
            input: truncate_for_error(input),
            reason,
        };
        if input.is_empty() {
            return Err(err(IdError::Empty));
        }
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(err(IdError::TooLong(input.len())));
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| err(IdError::WrongScheme))?;
        let td_end = rest.find('/').unwrap_or(rest.len());
        validate_trust_domain(&rest[..td_end], SCHEME.len()).map_err(err)?;
        let path = &rest[td_end..];
        validate_path(path, SCHEME.len() + td_end).map_err(err)?;
        Ok(SpiffeId {
            full: input.to_string(),
            path_start: SCHEME.len() + td_end,
        })
    }

    /// Builds `spiffe://<td><path>`; `path` must be empty or start with `/`.
    pub fn from_parts(td: &TrustDomain, path: &str) -> Result<Self, ParseIdError> {
        SpiffeId::new(&format!("{SCHEME}{}{path}", td.as_str()))
    }

    /// The Istio form `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn istio_workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, ParseIdError> {
        SpiffeId::from_parts(td, &format!("/ns/{namespace}/sa/{service_account}"))
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.full[SCHEME.len()..self.path_start].to_string())
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.full[SCHEME.len()..self.path_start]
    }

    /// The path, empty for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.full[self.path_start..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// `(namespace, service account)` when the ID has Istio's `/ns/<ns>/sa/<sa>` form.
    pub fn istio_parts(&self) -> Option<(&str, &str)> {
        let mut segs = self.path().strip_prefix('/')?.split('/');
        match (
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

fn validate_path(path: &str, offset: usize) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/': split into segments after each '/'.
    let mut seg_start = 1;
    for (i, c) in path.char_indices().skip(1) {
        if c == '/' {
            check_segment(&path[seg_start..i], offset + seg_start)?;
            seg_start = i + 1;
            continue;
        }
        let ok = c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        if !ok {
            return Err(IdError::BadPathChar {
                what: describe(c),
                pos: offset + i,
            });
        }
    }
    if seg_start == path.len() {
        return Err(IdError::TrailingSlash);
    }
    check_segment(&path[seg_start..], offset + seg_start)
}

fn check_segment(seg: &str, pos: usize) -> Result<(), IdError> {
    match seg {
        "" => Err(IdError::EmptySegment(pos)),
        "." | ".." => Err(IdError::DotSegment {
            seg: seg.to_string(),
            pos,
        }),
        _ => Ok(()),
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(s: &str) -> IdError {
        match SpiffeId::new(s) {
            Err(e) => e.reason,
            Ok(id) => panic!("{s} should be rejected, got {id}"),
        }
    }

    #[test]
    fn accepts_valid_ids() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/ns/default/sa/reviews",
            "spiffe://a_b-c.d/A.b-C_d/e",
            "spiffe://1/2",
        ] {
            let id = SpiffeId::new(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.as_str(), s);
        }
        let id = SpiffeId::new("spiffe://east.mesh/ns/shop/sa/payment").unwrap();
        assert_eq!(id.trust_domain_str(), "east.mesh");
        assert_eq!(id.path(), "/ns/shop/sa/payment");
        assert_eq!(id.istio_parts(), Some(("shop", "payment")));
        assert_eq!(SpiffeId::new("spiffe://east.mesh").unwrap().path(), "");
    }

    #[test]
    fn rejects_each_rule_with_a_named_reason() {
        assert_eq!(reason(""), IdError::Empty);
        assert_eq!(reason("https://example.org/a"), IdError::WrongScheme);
        assert_eq!(reason("SPIFFE://example.org/a"), IdError::WrongScheme);
        assert_eq!(reason("spiffe:///a"), IdError::EmptyTrustDomain);
        assert!(matches!(
            reason("spiffe://Example.org/a"),
            IdError::BadTrustDomainChar { pos: 9, .. }
        ));
        assert!(
            matches!(reason("spiffe://example.org:8080/a"), IdError::BadTrustDomainChar { what, pos: 20 } if what.contains("port"))
        );
        assert!(matches!(
            reason("spiffe://user@example.org/a"),
            IdError::BadTrustDomainChar { .. }
        ));
        assert!(
            matches!(reason("spiffe://example.org/a?x=1"), IdError::BadPathChar { what, .. } if what.contains("query"))
        );
        assert!(
            matches!(reason("spiffe://example.org/a#f"), IdError::BadPathChar { what, .. } if what.contains("fragment"))
        );
        assert!(
            matches!(reason("spiffe://example.org/a%20b"), IdError::BadPathChar { what, .. } if what.contains("percent"))
        );
        assert_eq!(reason("spiffe://example.org/"), IdError::TrailingSlash);
        assert_eq!(reason("spiffe://example.org/a/"), IdError::TrailingSlash);
        assert!(matches!(
            reason("spiffe://example.org//a"),
            IdError::EmptySegment(21)
        ));
        assert!(matches!(
            reason("spiffe://example.org/a/./b"),
            IdError::DotSegment { .. }
        ));
        assert!(matches!(
            reason("spiffe://example.org/.."),
            IdError::DotSegment { .. }
        ));
        assert!(matches!(
            reason("spiffe://exämple.org"),
            IdError::BadTrustDomainChar { .. }
        ));
    }

    #[test]
    fn length_limits() {
        let td = "a".repeat(255);
        assert!(TrustDomain::new(&td).is_ok());
        assert!(matches!(
            TrustDomain::new(&"a".repeat(256)).unwrap_err().reason,
            IdError::TrustDomainTooLong(256)
        ));
        let path = "/x".repeat((MAX_SPIFFE_ID_LEN - 30) / 2);
        let ok = format!("spiffe://example.org{path}");
        assert!(ok.len() <= MAX_SPIFFE_ID_LEN);
        assert!(SpiffeId::new(&ok).is_ok());
        let long = format!("spiffe://example.org{}", "/x".repeat(1100));
        assert!(matches!(reason(&long), IdError::TooLong(_)));
    }

    #[test]
    fn error_message_names_input_and_reason() {
        let e = SpiffeId::new("spiffe://east.mesh/ns//sa").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("spiffe://east.mesh/ns//sa"), "{msg}");
        assert!(msg.contains("empty segment"), "{msg}");
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(
            TrustDomain::new("spiffe://east.mesh").unwrap().as_str(),
            "east.mesh"
        );
        assert!(TrustDomain::new("east.mesh/x").is_err());
        let td = TrustDomain::new("east.mesh").unwrap();
        let id = SpiffeId::istio_workload(&td, "shop", "payment").unwrap();
        assert_eq!(id.as_str(), "spiffe://east.mesh/ns/shop/sa/payment");
        assert!(
            SpiffeId::istio_workload(&td, "a/b", "c").is_ok_and(|id| id.istio_parts().is_none())
        );
        assert!(SpiffeId::istio_workload(&td, "", "c").is_err());
    }
}
