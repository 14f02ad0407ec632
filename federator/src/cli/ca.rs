//! `meshfed ca init` and `meshfed ca issue`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use trust::ca::policy::AnyWorkload;
use trust::ca::{cacerts, CaOptions};
use trust::{CertificateAuthority, SpiffeId, TrustDomain};

use super::args;

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA (new root and signing intermediate) or import an Istio plug-in CA, and
    /// write it in the Istio `cacerts` layout.
    Init(InitArgs),
    /// Issue an X509-SVID: writes cert-chain.pem, key.pem (0600) and root-cert.pem.
    Issue(IssueArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Trust domain of the cluster, e.g. east.mesh.
    #[arg(long, value_parser = args::trust_domain)]
    trust_domain: TrustDomain,
    /// Directory to write the CA to.
    #[arg(long)]
    out: PathBuf,
    /// Import an existing Istio `cacerts` directory (ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem) instead of creating a new root, so the cluster keeps its root.
    #[arg(long)]
    from_cacerts: Option<PathBuf>,
    /// Lifetime of a new root.
    #[arg(long, default_value = "3650d", value_parser = args::duration)]
    root_ttl: time::Duration,
    /// Lifetime of a new signing intermediate.
    #[arg(long, default_value = "365d", value_parser = args::duration)]
    ca_ttl: time::Duration,
    /// Replace a CA already present in --out.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// CA directory written by `meshfed ca init`.
    #[arg(long)]
    ca: PathBuf,
    /// SPIFFE ID to issue, e.g. spiffe://east.mesh/ns/shop/sa/payment.
    #[arg(long, value_parser = args::spiffe_id)]
    spiffe_id: SpiffeId,
    /// Directory to write cert-chain.pem, key.pem and root-cert.pem to.
    #[arg(long)]
    out: PathBuf,
    /// Certificate lifetime.
    #[arg(long, default_value = "24h", value_parser = args::duration)]
    ttl: time::Duration,
}

pub fn run(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CaCommand::Init(a) => init(a),
        CaCommand::Issue(a) => issue(a),
    }
}

pub(crate) fn fingerprint(der: &[u8]) -> String {
    trust::keys::fingerprint(der)
}

fn init(a: InitArgs) -> anyhow::Result<ExitCode> {
    if CertificateAuthority::exists_in(&a.out) && !a.force {
        bail!(
            "{} already holds a CA ({}); pass --force to replace it",
            a.out.display(),
            cacerts::METADATA
        );
    }
    let options = CaOptions {
        root_ttl: a.root_ttl,
        intermediate_ttl: a.ca_ttl,
        ..CaOptions::default()
    };
    let ca = match &a.from_cacerts {
        Some(dir) => cacerts::load_plugin(dir, &a.trust_domain, options)
            .with_context(|| format!("cannot import the Istio CA in {}", dir.display()))?,
        None => CertificateAuthority::create(a.trust_domain.clone(), options)?,
    };
    ca.save(&a.out)
        .with_context(|| format!("cannot write the CA to {}", a.out.display()))?;
    println!("trust domain:  {}", ca.trust_domain());
    for (i, root) in ca.roots().iter().enumerate() {
        println!("root {}:        sha256:{}", i + 1, fingerprint(root));
    }
    println!("signer expiry: {}", args::rfc3339(ca.expires_at()));
    println!(
        "wrote {} ({}, {}, {}, {})",
        a.out.display(),
        cacerts::CA_CERT,
        cacerts::CA_KEY,
        cacerts::CERT_CHAIN,
        cacerts::ROOT_CERT
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn load_ca(dir: &std::path::Path) -> anyhow::Result<CertificateAuthority> {
    if !CertificateAuthority::exists_in(dir) {
        bail!(
            "{} is not a meshfed CA directory (no {}); create one with `meshfed ca init`",
            dir.display(),
            cacerts::METADATA
        );
    }
    CertificateAuthority::load(dir)
        .with_context(|| format!("cannot load the CA in {}", dir.display()))
}

fn issue(a: IssueArgs) -> anyhow::Result<ExitCode> {
    let ca = load_ca(&a.ca)?;
    let svid = ca.issue_svid(&a.spiffe_id, &AnyWorkload, a.ttl)?;
    svid.write_files(&a.out, &ca.roots())
        .with_context(|| format!("cannot write the SVID to {}", a.out.display()))?;
    // Record the issued certificate's expiry, which decides when a retiring root may go.
    ca.save(&a.ca)
        .with_context(|| format!("cannot update the CA state in {}", a.ca.display()))?;
    println!("issued:   {}", svid.id);
    println!("expires:  {}", args::rfc3339(svid.not_after));
    println!(
        "wrote {} (cert-chain.pem, key.pem, root-cert.pem)",
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
