//! meshfed's trust layer: SPIFFE identities, per-cluster certificate authorities, SPIFFE trust
//! bundles kept per trust domain (never merged), and rustls verifiers that validate each peer
//! against its own trust domain's bundle.
//!
//! See `docs/trust.md` for the trust model, the rotation timeline and the file layouts.

pub mod bundle;
pub mod ca;
pub mod error;
pub mod files;
pub mod keys;
pub mod spiffe_id;
pub mod svid;
pub mod tls;

pub use bundle::{BundleError, BundleSet, TrustBundle, TrustStore};
pub use ca::{CaOptions, CertificateAuthority, IssuedCert};
pub use error::TrustError;
pub use spiffe_id::{SpiffeId, TrustDomain};
pub use svid::Svid;
