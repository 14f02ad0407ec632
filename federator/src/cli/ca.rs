//! `meshfed ca init`, `meshfed ca issue` and `meshfed ca rotate`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use time::OffsetDateTime;
use trust::ca::policy::AnyWorkload;
use trust::ca::{cacerts, CaDir, CaOptions};
use trust::{CertificateAuthority, SpiffeId, TrustDomain};

use super::args;

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a CA (new root and signing intermediate) or import an Istio plug-in CA, and
    /// write it in the Istio `cacerts` layout.
    Init(InitArgs),
    /// Issue an X509-SVID: writes cert-chain.pem, key.pem (0600) and root-cert.pem.
    Issue(IssueArgs),
    /// Rotate the CA's root, make-before-break (a running agent follows and finishes it).
    #[command(subcommand)]
    Rotate(RotateCommand),
}

#[derive(Debug, Subcommand)]
pub enum RotateCommand {
    /// Publish a new root in the bundle (sequence + 1). It signs once the publish lead has
    /// passed and every member holds the bundle; the old root leaves the bundle after the
    /// last certificate it signed has expired.
    Start(RotateStartArgs),
    /// Show the generations, their states and what the rotation waits on.
    Status(RotateStatusArgs),
    /// Let the pending root sign now, before its publish lead has passed: only when the
    /// federator says every member holds the bundle that carries it (or with --force).
    Activate(RotateActivateArgs),
}

/// Which CA: a cluster's (`--state-dir`) or a CA directory (`--ca`).
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct CaLocation {
    /// The cluster's state directory (its CA is under ca/).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// A CA directory written by `meshfed ca init`.
    #[arg(long)]
    ca: Option<PathBuf>,
}

impl CaLocation {
    fn dir(&self) -> PathBuf {
        match (&self.state_dir, &self.ca) {
            (Some(s), _) => meshfed_identity::cluster::ca_dir(s),
            (None, Some(c)) => c.clone(),
            (None, None) => PathBuf::new(),
        }
    }
}

#[derive(Debug, Args)]
pub struct RotateStartArgs {
    #[command(flatten)]
    at: CaLocation,
    /// How long the new root is published before it signs.
    #[arg(long, default_value = "20m", value_parser = args::duration)]
    publish_lead: time::Duration,
}

#[derive(Debug, Args)]
pub struct RotateStatusArgs {
    #[command(flatten)]
    at: CaLocation,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct RotateActivateArgs {
    #[command(flatten)]
    at: CaLocation,
    /// Activate without asking the federator (peers that lack the new root then refuse
    /// certificates signed under it until they get the bundle).
    #[arg(long)]
    force: bool,
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
        CaCommand::Rotate(RotateCommand::Start(a)) => rotate_start(a),
        CaCommand::Rotate(RotateCommand::Status(a)) => rotate_status(a),
        CaCommand::Rotate(RotateCommand::Activate(a)) => rotate_activate(a),
    }
}

fn ca_dir(at: &CaLocation) -> anyhow::Result<CaDir> {
    let dir = at.dir();
    if !CertificateAuthority::exists_in(&dir) {
        bail!(
            "{} is not a meshfed CA directory (no {})",
            dir.display(),
            cacerts::METADATA
        );
    }
    Ok(CaDir::new(dir))
}

fn rotate_start(a: RotateStartArgs) -> anyhow::Result<ExitCode> {
    let dir = ca_dir(&a.at)?;
    let now = OffsetDateTime::now_utc();
    let ((), ca) = dir
        .update(|ca| ca.begin_rotation(now, a.publish_lead))
        .with_context(|| {
            format!(
                "cannot start a rotation of the CA in {}",
                dir.path().display()
            )
        })?;
    println!(
        "new root published: bundle sequence {} holds {} roots",
        ca.bundle_sequence(),
        ca.roots().len()
    );
    println!(
        "it signs from {} at the earliest, once every member holds this bundle (a running agent checks)",
        args::rfc3339(now + a.publish_lead)
    );
    Ok(ExitCode::SUCCESS)
}

fn rotate_status(a: RotateStatusArgs) -> anyhow::Result<ExitCode> {
    let dir = ca_dir(&a.at)?;
    let lock = dir.lock()?;
    let ca = dir.load(&lock)?;
    drop(lock);
    let report = meshfed_identity::live_ca::report_of(&ca, OffsetDateTime::now_utc(), Vec::new());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", render_report(&report));
    Ok(ExitCode::SUCCESS)
}

/// The CA report as `meshfed ca rotate status` and `meshfed status` print it.
pub(crate) fn render_report(r: &meshfed_identity::live_ca::CaReport) -> String {
    let mut out = format!(
        "CA {}: bundle sequence {}, signer expires {} ({} days left)\n",
        r.trust_domain, r.bundle_sequence, r.signer_not_after, r.signer_days_left
    );
    out += &format!(
        "  {:<18} {:<9} {:<21} {:<21} {}\n",
        "ROOT", "STATE", "CREATED", "ROOT EXPIRES", "UNTIL"
    );
    for g in &r.generations {
        out += &format!(
            "  {:<18} {:<9} {:<21} {:<21} {}\n",
            g.root,
            g.state,
            g.created_at,
            g.root_not_after,
            g.until.as_deref().unwrap_or("-")
        );
    }
    if !r.waiting_for.is_empty() {
        out += &format!("  the new root waits for: {}\n", r.waiting_for.join(", "));
    }
    out
}

fn rotate_activate(a: RotateActivateArgs) -> anyhow::Result<ExitCode> {
    let dir = ca_dir(&a.at)?;
    if !a.force {
        let Some(state) = &a.at.state_dir else {
            bail!("--ca has no federation to ask whether the new root was distributed; use --state-dir, or --force");
        };
        let seq = {
            let lock = dir.lock()?;
            dir.load(&lock)?.bundle_sequence()
        };
        let d = super::runtime()?.block_on(ask_distribution(state))?;
        if d.stored_sequence < seq {
            bail!(
                "the federator holds bundle sequence {} of this cluster, not {seq}: is the agent running and connected?",
                d.stored_sequence
            );
        }
        if !d.pending.is_empty() {
            bail!(
                "not every member holds bundle sequence {seq} yet: {} (held by {})",
                d.pending.join(", "),
                if d.holders.is_empty() {
                    "none".to_string()
                } else {
                    d.holders.join(", ")
                }
            );
        }
    }
    let now = OffsetDateTime::now_utc();
    let (_, ca) = dir
        .update(|ca| ca.activate_now(now))
        .with_context(|| format!("cannot activate the new root in {}", dir.path().display()))?;
    println!(
        "the new root signs now; bundle sequence {}; the old root leaves after the last certificate it signed expires",
        ca.bundle_sequence()
    );
    Ok(ExitCode::SUCCESS)
}

async fn ask_distribution(
    state_dir: &std::path::Path,
) -> anyhow::Result<proto::BundleDistributionResponse> {
    let id = meshfed_identity::cluster::ClusterIdentity::load(state_dir)?;
    let (cfg, _) = id.client_config()?;
    let mut client = proto::federation_client::FederationClient::new(meshfed_net::channel(
        id.file.federators.clone(),
        cfg,
        "federator",
    )?);
    Ok(client
        .bundle_distribution(proto::BundleDistributionRequest {})
        .await
        .map_err(|s| meshfed_identity::cluster::describe_status("bundle distribution", &s))?
        .into_inner())
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
    load_ca(&a.ca)?;
    // Issued and recorded under the CA directory's lock: the issued certificate's expiry
    // decides when a retiring root may leave the bundle, and a running agent shares the files.
    let (svid, ca) = CaDir::new(&a.ca)
        .issue_svid(&a.spiffe_id, &AnyWorkload, a.ttl)
        .with_context(|| format!("cannot issue from the CA in {}", a.ca.display()))?;
    svid.write_files(&a.out, &ca.roots())
        .with_context(|| format!("cannot write the SVID to {}", a.out.display()))?;
    println!("issued:   {}", svid.id);
    println!("expires:  {}", args::rfc3339(svid.not_after));
    println!(
        "wrote {} (cert-chain.pem, key.pem, root-cert.pem)",
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
