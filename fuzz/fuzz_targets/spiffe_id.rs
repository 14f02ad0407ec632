//! SPIFFE ID and trust domain parsing must never panic, and whatever it accepts must obey the
//! rules and print back to the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trust::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::new(s) {
        assert_eq!(id.as_str(), s);
        assert!(s.len() <= trust::spiffe_id::MAX_SPIFFE_ID_LEN);
        let td = id.trust_domain();
        assert!(td.as_str().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
        assert!(!id.path().ends_with('/'));
        assert!(!id.path().contains("//"));
        assert_eq!(SpiffeId::from_parts(&td, id.path()).ok().as_ref(), Some(&id));
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert!(SpiffeId::new(&td.id_string()).is_ok());
    }
});
