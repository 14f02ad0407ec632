//! `meshfed bundle show` and `meshfed bundle verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rustls_pki_types::UnixTime;
use trust::bundle::{is_bundle_map, parse_bundle_map};
use trust::tls::{Authorizer, PeerRole, SpiffeVerifier};
use trust::{BundleSet, TrustBundle, TrustDomain, TrustStore};

use super::{args, ca::load_ca, EXIT_CHECK_FAILED};

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print a CA's SPIFFE trust bundle (JWK Set JSON).
    Show(ShowArgs),
    /// Check a certificate chain against the bundle of its own trust domain.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// CA directory written by `meshfed ca init`.
    #[arg(long)]
    ca: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A SPIFFE bundle (as `bundle show` prints) or a bundle map {"trust_domains": {...}}.
    #[arg(long)]
    bundle: PathBuf,
    /// PEM file with the chain to check: leaf first, then intermediates.
    #[arg(long)]
    cert: PathBuf,
    /// Trust domain of a single bundle (default: the SPIFFE ID its roots carry).
    #[arg(long, value_parser = args::trust_domain)]
    trust_domain: Option<TrustDomain>,
}

pub fn run(cmd: BundleCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BundleCommand::Show(a) => {
            let ca = load_ca(&a.ca)?;
            println!("{}", ca.bundle().to_json()?);
            Ok(ExitCode::SUCCESS)
        }
        BundleCommand::Verify(a) => verify(a),
    }
}

/// The trust domain named by the roots of a bundle (meshfed roots carry `spiffe://<td>`).
fn trust_domain_of_roots(b: &TrustBundle) -> Option<TrustDomain> {
    b.x509_authorities
        .iter()
        .find_map(|r| trust::svid::spiffe_id_of(r).ok())
        .filter(|id| id.path().is_empty())
        .map(|id| id.trust_domain())
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let what = a.bundle.display().to_string();
    let text = std::fs::read_to_string(&a.bundle).with_context(|| format!("cannot read {what}"))?;
    let mut set = BundleSet::new();
    if is_bundle_map(&text) {
        for b in parse_bundle_map(&text, &what)? {
            set.insert(b)?;
        }
    } else {
        // Parse once under a placeholder name to learn the roots, then under the real name.
        let placeholder = TrustDomain::new("unknown")?;
        let probe = TrustBundle::from_json(placeholder, &text, &what)?;
        let td = match a.trust_domain.clone().or_else(|| trust_domain_of_roots(&probe)) {
            Some(td) => td,
            None => bail!("{what}: its roots carry no SPIFFE ID; say which trust domain it belongs to with --trust-domain"),
        };
        set.insert(TrustBundle {
            trust_domain: td,
            ..probe
        })?;
    }
    let cert_what = a.cert.display().to_string();
    let pem = std::fs::read(&a.cert).with_context(|| format!("cannot read {cert_what}"))?;
    let chain = trust::keys::certs_from_pem(&pem, &cert_what)?;
    let verifier = SpiffeVerifier::new(TrustStore::new(set), Authorizer::Any);
    let now = UnixTime::now();
    let result = verifier
        .verify(&chain[0], &chain[1..], now, PeerRole::Server)
        .and_then(|_| verifier.verify(&chain[0], &chain[1..], now, PeerRole::Client));
    match result {
        Ok(id) => {
            let (_, not_after) = trust::svid::validity(&chain[0])?;
            println!(
                "valid: {id} (trust domain {}, expires {})",
                id.trust_domain(),
                args::rfc3339(not_after)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("invalid: {e}");
            Ok(ExitCode::from(EXIT_CHECK_FAILED))
        }
    }
}
