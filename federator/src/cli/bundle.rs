//! `meshfed bundle show`, `meshfed bundle verify` and `meshfed bundle fetch`.

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
    /// Read a bundle from a SPIFFE bundle endpoint (https_spiffe profile), authenticating the
    /// endpoint by its SPIFFE ID against a bundle already held; prints the bundle.
    Fetch(FetchArgs),
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The endpoint, https://host[:port][/path].
    url: String,
    /// `https_spiffe` profile: the SPIFFE ID the endpoint's certificate must carry (with
    /// --trust-bundle). Without it, the `https_web` profile: the endpoint is checked as any
    /// HTTPS server (host name, chain to a trusted root; see --ca-file).
    #[arg(long, value_parser = args::spiffe_id, requires = "trust_bundle")]
    endpoint_spiffe_id: Option<trust::SpiffeId>,
    /// A bundle (or bundle map) to authenticate the endpoint with: the bundle of the endpoint
    /// ID's trust domain, as last obtained (`https_spiffe`).
    #[arg(long, requires = "endpoint_spiffe_id")]
    trust_bundle: Option<PathBuf>,
    /// `https_web`: the PEM roots to trust instead of the system's.
    #[arg(long, conflicts_with = "endpoint_spiffe_id")]
    ca_file: Option<PathBuf>,
    /// The trust domain of the bundle served (default: the endpoint ID's; required with
    /// `https_web`).
    #[arg(long, value_parser = args::trust_domain, required_unless_present = "endpoint_spiffe_id")]
    trust_domain: Option<TrustDomain>,
    /// Write the bundle here (atomically) instead of printing it.
    #[arg(long)]
    out: Option<PathBuf>,
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
        BundleCommand::Fetch(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(fetch(a)),
    }
}

/// Reads a bundle or bundle map file into a set (a single bundle for `td`).
fn read_bundles(path: &std::path::Path, td: &TrustDomain) -> anyhow::Result<BundleSet> {
    let what = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {what}"))?;
    let mut set = BundleSet::new();
    if is_bundle_map(&text) {
        for b in parse_bundle_map(&text, &what)? {
            set.insert(b)?;
        }
    } else {
        set.insert(TrustBundle::from_json(td.clone(), &text, &what)?)?;
    }
    Ok(set)
}

async fn fetch(a: FetchArgs) -> anyhow::Result<ExitCode> {
    let (tls, td, profile) = match (&a.endpoint_spiffe_id, &a.trust_bundle) {
        (Some(id), Some(held)) => {
            let endpoint_td = id.trust_domain();
            let set = read_bundles(held, &endpoint_td)?;
            let verifier = SpiffeVerifier::new(TrustStore::new(set), Authorizer::id(id.clone()));
            (
                trust::tls::client_config(trust::tls::SvidResolver::new(), verifier)?,
                a.trust_domain.clone().unwrap_or(endpoint_td),
                format!("https_spiffe, {id}"),
            )
        }
        _ => (
            meshfed_net::bundle_endpoint::web_client_config(a.ca_file.as_deref())?,
            a.trust_domain
                .clone()
                .context("--trust-domain is required with the https_web profile")?,
            "https_web".to_string(),
        ),
    };
    let body = meshfed_net::bundle_endpoint::fetch(&a.url, tls).await?;
    let bundle = TrustBundle::from_json(td.clone(), &body, &a.url)?;
    eprintln!(
        "bundle of {td} from {} ({}): {} root(s), sequence {}",
        a.url,
        profile,
        bundle.x509_authorities.len(),
        bundle
            .sequence
            .map(|s| s.to_string())
            .unwrap_or_else(|| "none".into())
    );
    let json = bundle.to_json()?;
    match &a.out {
        Some(p) => trust::files::write_atomic(p, json.as_bytes(), trust::files::PUBLIC_MODE)?,
        None => println!("{json}"),
    }
    Ok(ExitCode::SUCCESS)
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
        if probe.x509_authorities.is_empty() {
            bail!("{what}: the bundle holds no X.509 root (its \"keys\" list has no x509-svid key); nothing could be verified against it");
        }
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
