//! Reading a TLS ClientHello without terminating TLS.
//!
//! [`parse`] looks at the bytes a client has sent so far and says whether a complete
//! ClientHello is there, more bytes are needed, or the input is not one. The ClientHello may be
//! split across TCP segments and across several TLS records (a handshake message can be larger
//! than one 16 KiB record, e.g. with post-quantum key shares or padding); it is reassembled up to
//! [`MAX_HELLO`] bytes. Nothing is copied out but the SNI and the ALPN names, and the caller
//! forwards the buffered bytes unchanged.

/// Largest ClientHello handshake message accepted (RFC 8446 allows 2^24-1; real ones are a few
/// KiB, up to ~2 KiB more with post-quantum key shares).
pub const MAX_HELLO: usize = 64 * 1024;
/// Largest TLS plaintext record (RFC 8446 5.1).
pub const MAX_RECORD: usize = 16 * 1024;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// What a ClientHello says that routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The host_name entry of server_name, if any (lowercased).
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order.
    pub alpn: Vec<String>,
    /// Bytes of the input that carry the ClientHello (whole records).
    pub consumed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A complete ClientHello.
    Done(ClientHello),
    /// Not enough bytes yet; at least this many more are needed.
    NeedMore(usize),
}

/// Why the bytes are not a ClientHello we accept. [`HelloError::alert`] gives the TLS alert to
/// send before closing (none for input that is not TLS at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not TLS: the first byte is {0:#04x}, not a handshake record (0x16)")]
    NotTls(u8),
    #[error("not TLS: record version {0:#06x}")]
    BadVersion(u16),
    #[error("a TLS record of {0} bytes is larger than 16 KiB")]
    RecordOverflow(usize),
    #[error("the first handshake message is type {0}, not a ClientHello")]
    NotClientHello(u8),
    #[error("a ClientHello of {0} bytes is larger than the {MAX_HELLO} bytes accepted")]
    TooLarge(usize),
    #[error("a non-handshake record (type {0}) arrived before the ClientHello was complete")]
    Interleaved(u8),
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// TLS alert descriptions (RFC 8446 6).
pub mod alert {
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const HANDSHAKE_FAILURE: u8 = 40;
    pub const ILLEGAL_PARAMETER: u8 = 47;
    pub const DECODE_ERROR: u8 = 50;
    pub const PROTOCOL_VERSION: u8 = 70;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const UNRECOGNIZED_NAME: u8 = 112;
    pub const NO_APPLICATION_PROTOCOL: u8 = 120;
}

impl HelloError {
    /// The alert to send, or `None` when the peer does not speak TLS.
    pub fn alert(&self) -> Option<u8> {
        match self {
            HelloError::NotTls(_) | HelloError::BadVersion(_) => None,
            HelloError::RecordOverflow(_) => Some(alert::RECORD_OVERFLOW),
            HelloError::NotClientHello(_) | HelloError::Interleaved(_) => {
                Some(alert::UNEXPECTED_MESSAGE)
            }
            HelloError::TooLarge(_) => Some(alert::HANDSHAKE_FAILURE),
            HelloError::Malformed(_) => Some(alert::DECODE_ERROR),
        }
    }

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::NotTls(_) | HelloError::BadVersion(_) => "not_tls",
            HelloError::RecordOverflow(_) => "record_overflow",
            HelloError::NotClientHello(_) | HelloError::Interleaved(_) => "unexpected_message",
            HelloError::TooLarge(_) => "hello_too_large",
            HelloError::Malformed(_) => "malformed_hello",
        }
    }
}

/// A fatal TLS alert record (TLS 1.2 record version, as servers send before a version is agreed).
pub fn alert_record(description: u8) -> [u8; 7] {
    [21, 3, 3, 0, 2, 2, description]
}

/// Reads as much of a ClientHello as `buf` holds.
pub fn parse(buf: &[u8]) -> Result<Progress, HelloError> {
    // Reassemble the handshake stream from consecutive handshake records.
    let mut hs: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        if buf.len() < pos + 5 {
            if pos == 0 && !buf.is_empty() && buf[0] != CONTENT_HANDSHAKE {
                return Err(HelloError::NotTls(buf[0]));
            }
            return Ok(Progress::NeedMore(pos + 5 - buf.len()));
        }
        let ctype = buf[pos];
        if ctype != CONTENT_HANDSHAKE {
            return Err(if pos == 0 {
                HelloError::NotTls(ctype)
            } else {
                HelloError::Interleaved(ctype)
            });
        }
        let version = u16::from_be_bytes([buf[pos + 1], buf[pos + 2]]);
        if version >> 8 != 3 || version > 0x0304 {
            return Err(HelloError::BadVersion(version));
        }
        let len = usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]));
        if len > MAX_RECORD {
            return Err(HelloError::RecordOverflow(len));
        }
        if len == 0 {
            return Err(HelloError::Malformed("an empty handshake record"));
        }
        let end = pos + 5 + len;
        if buf.len() < end {
            return Ok(Progress::NeedMore(end - buf.len()));
        }
        hs.extend_from_slice(&buf[pos + 5..end]);
        pos = end;
        if hs.len() >= 4 {
            if hs[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::NotClientHello(hs[0]));
            }
            let body = (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if body > MAX_HELLO {
                return Err(HelloError::TooLarge(body));
            }
            if hs.len() >= 4 + body {
                let mut hello = client_hello(&hs[4..4 + body])?;
                hello.consumed = pos;
                return Ok(Progress::Done(hello));
            }
        }
    }
}

/// A cursor over a byte slice that never panics.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.b.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }
}

fn client_hello(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader { b: body };
    r.take(2, "legacy_version is cut short")?;
    r.take(32, "random is cut short")?;
    let sid = r.vec8("session id is cut short")?;
    if sid.len() > 32 {
        return Err(HelloError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16("cipher suites are cut short")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed(
            "cipher suites must be a non-empty list of pairs",
        ));
    }
    let comp = r.vec8("compression methods are cut short")?;
    if comp.is_empty() {
        return Err(HelloError::Malformed("no compression methods"));
    }
    let mut hello = ClientHello {
        sni: None,
        alpn: Vec::new(),
        consumed: 0,
    };
    if r.b.is_empty() {
        return Ok(hello); // TLS 1.2 without extensions
    }
    let exts = r.vec16("extensions are cut short")?;
    if !r.b.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let mut e = Reader { b: exts };
    let mut seen: Vec<u16> = Vec::new();
    while !e.b.is_empty() {
        let ty = e.u16("an extension header is cut short")?;
        let data = e.vec16("an extension is cut short")?;
        if seen.contains(&ty) {
            return Err(HelloError::Malformed("an extension appears twice"));
        }
        seen.push(ty);
        match ty {
            EXT_SERVER_NAME => hello.sni = server_name(data)?,
            EXT_ALPN => hello.alpn = alpn(data)?,
            _ => {}
        }
    }
    Ok(hello)
}

fn server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { b: data };
    let list = r.vec16("server_name list is cut short")?;
    if !r.b.is_empty() {
        return Err(HelloError::Malformed("bytes after the server_name list"));
    }
    let mut l = Reader { b: list };
    let mut name = None;
    while !l.b.is_empty() {
        let ty = l.u8("a server_name entry is cut short")?;
        let n = l.vec16("a server name is cut short")?;
        if ty == 0 {
            if name.is_some() {
                return Err(HelloError::Malformed("two host names in server_name"));
            }
            if n.is_empty() || !n.iter().all(|b| b.is_ascii_graphic()) {
                return Err(HelloError::Malformed(
                    "a host name that is not printable ASCII",
                ));
            }
            name = Some(String::from_utf8_lossy(n).to_ascii_lowercase());
        }
    }
    Ok(name)
}

fn alpn(data: &[u8]) -> Result<Vec<String>, HelloError> {
    let mut r = Reader { b: data };
    let list = r.vec16("the ALPN list is cut short")?;
    if !r.b.is_empty() || list.is_empty() {
        return Err(HelloError::Malformed("a malformed ALPN list"));
    }
    let mut l = Reader { b: list };
    let mut out = Vec::new();
    while !l.b.is_empty() {
        let p = l.vec8("an ALPN name is cut short")?;
        if p.is_empty() {
            return Err(HelloError::Malformed("an empty ALPN name"));
        }
        out.push(String::from_utf8_lossy(p).into_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello from rustls, as one or more records.
    fn rustls_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Splits the handshake payload of `records` into records of at most `size` bytes.
    fn reframe(records: &[u8], size: usize) -> Vec<u8> {
        let mut hs = Vec::new();
        let mut pos = 0;
        while pos + 5 <= records.len() {
            let len = usize::from(u16::from_be_bytes([records[pos + 3], records[pos + 4]]));
            hs.extend_from_slice(&records[pos + 5..pos + 5 + len]);
            pos += 5 + len;
        }
        let mut out = Vec::new();
        for chunk in hs.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A ClientHello with a padding extension making the handshake message `total` bytes.
    fn padded(sni: &str, total: usize) -> Vec<u8> {
        let rec = rustls_hello(sni, &["istio"]);
        let len = usize::from(u16::from_be_bytes([rec[3], rec[4]]));
        let mut hs = rec[5..5 + len].to_vec();
        let body_len = hs.len() - 4;
        let pad = total - 4 - body_len - 4;
        // extensions length sits at the end of the fixed fields; find it by walking.
        let mut p = 4 + 2 + 32;
        p += 1 + usize::from(hs[p]);
        p += 2 + usize::from(u16::from_be_bytes([hs[p], hs[p + 1]]));
        p += 1 + usize::from(hs[p]);
        let ext_len = usize::from(u16::from_be_bytes([hs[p], hs[p + 1]])) + 4 + pad;
        hs[p..p + 2].copy_from_slice(&(ext_len as u16).to_be_bytes());
        hs.extend_from_slice(&21u16.to_be_bytes());
        hs.extend_from_slice(&(pad as u16).to_be_bytes());
        hs.extend(std::iter::repeat_n(0u8, pad));
        let body = hs.len() - 4;
        hs[1..4].copy_from_slice(&(body as u32).to_be_bytes()[1..]);
        // Frame as records of at most 16 KiB.
        let mut out = Vec::new();
        for chunk in hs.chunks(MAX_RECORD) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn done(b: &[u8]) -> ClientHello {
        match parse(b).unwrap() {
            Progress::Done(h) => h,
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn reads_sni_and_alpn_from_a_real_client_hello() {
        let b = rustls_hello(
            "outbound_.9080_._.reviews.shop.svc.cluster.local",
            &["istio", "h2"],
        );
        let h = done(&b);
        assert_eq!(
            h.sni.as_deref(),
            Some("outbound_.9080_._.reviews.shop.svc.cluster.local")
        );
        assert_eq!(h.alpn, vec!["istio".to_string(), "h2".to_string()]);
        assert_eq!(h.consumed, b.len());
    }

    #[test]
    fn every_tcp_split_and_record_split_works() {
        let b = rustls_hello("payment.shop.svc.cluster.local", &["istio"]);
        // Byte by byte, as if every TCP segment carried one byte.
        for i in 0..b.len() {
            match parse(&b[..i]).unwrap() {
                Progress::NeedMore(n) => assert!(n >= 1 && i + n <= b.len(), "{i}: {n}"),
                p => panic!("complete after {i} of {} bytes: {p:?}", b.len()),
            }
        }
        // The handshake message split over records of 1, 7 and 100 bytes.
        for size in [1, 7, 100] {
            let r = reframe(&b, size);
            let h = done(&r);
            assert_eq!(h.sni.as_deref(), Some("payment.shop.svc.cluster.local"));
            assert_eq!(h.consumed, r.len());
        }
    }

    #[test]
    fn client_hellos_of_16k_and_beyond_span_records() {
        for total in [MAX_RECORD, MAX_RECORD + 1, 40_000] {
            let b = padded("big.shop.svc.cluster.local", total);
            let h = done(&b);
            assert_eq!(
                h.sni.as_deref(),
                Some("big.shop.svc.cluster.local"),
                "{total}"
            );
            assert_eq!(h.alpn, vec!["istio".to_string()]);
        }
        let b = padded("big.shop.svc.cluster.local", MAX_HELLO + 4 + 1);
        assert_eq!(parse(&b).unwrap_err(), HelloError::TooLarge(MAX_HELLO + 1));
    }

    #[test]
    fn data_after_the_hello_is_left_for_forwarding() {
        let mut b = rustls_hello("a.b", &["istio"]);
        let n = b.len();
        b.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(done(&b).consumed, n);
    }

    #[test]
    fn what_is_not_a_client_hello_is_refused_with_the_right_alert() {
        let e = parse(b"GET / HTTP/1.1\r\n").unwrap_err();
        assert_eq!((e.clone(), e.alert()), (HelloError::NotTls(b'G'), None));
        assert_eq!(parse(b"G").unwrap_err(), HelloError::NotTls(b'G'));
        assert_eq!(
            parse(&[22, 9, 9, 0, 1, 1]).unwrap_err(),
            HelloError::BadVersion(0x0909)
        );
        assert_eq!(
            parse(&[22, 3, 1, 0x40, 0x01]).unwrap_err().alert(),
            Some(alert::RECORD_OVERFLOW)
        );
        // A ServerHello (type 2) where a ClientHello should be.
        assert_eq!(
            parse(&[22, 3, 3, 0, 4, 2, 0, 0, 0]).unwrap_err(),
            HelloError::NotClientHello(2)
        );
        // An alert record between two parts of the hello.
        let b = reframe(&rustls_hello("a.b", &[]), 10);
        let mut x = b[..15].to_vec();
        x.extend_from_slice(&[21, 3, 3, 0, 2, 1, 0]);
        assert_eq!(parse(&x).unwrap_err(), HelloError::Interleaved(21));
        // Truncated insides: declared lengths larger than the message.
        let mut b = rustls_hello("a.b", &["istio"]);
        let l = b.len();
        b[l - 1] ^= 0xff;
        let _ = parse(&b); // any outcome but a panic
    }

    #[test]
    fn no_sni_and_no_alpn_are_reported_as_absent() {
        // rustls sends no SNI for an IP address.
        let b = rustls_hello("10.0.0.1", &[]);
        let h = done(&b);
        assert_eq!(h.sni, None);
        assert!(h.alpn.is_empty());
    }

    #[test]
    fn alert_records_are_well_formed() {
        assert_eq!(
            alert_record(alert::UNRECOGNIZED_NAME),
            [21, 3, 3, 0, 2, 2, 112]
        );
    }
}
