//! The demo's meshfed processes: this same binary run as `meshfed federator`, `agent`,
//! `gateway` and `vm agent`, inside a network namespace (`ip netns exec`) or on the host,
//! each logging to `<state>/logs/<name>.log`. Killed when dropped, so an interrupted demo
//! leaves no process behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

#[derive(Debug)]
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `meshfed <args>` in namespace `ns` (or the host's network).
    pub fn spawn(
        name: &str,
        ns: Option<&str>,
        args: &[String],
        log_dir: &Path,
    ) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe().context("cannot find the meshfed binary")?;
        let (program, args) = meshfed_harness::netns::command_in(ns, &exe, args);
        std::fs::create_dir_all(log_dir)?;
        let mut p = Proc {
            name: name.into(),
            program,
            args,
            log: log_dir.join(format!("{name}.log")),
            child: None,
        };
        p.start()?;
        Ok(p)
    }

    /// (Re)starts the process with its arguments, appending to its log.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9, as a crash or a lost machine.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// An error naming the process and the end of its log when it has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                anyhow::bail!(
                    "{} exited ({st}); last lines of {}:\n{}",
                    self.name,
                    self.log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the admin endpoint at `addr` serves `/status`, or `p` exits.
pub async fn wait_serving(p: &mut Proc, addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        p.check_running()?;
        if meshfed_net::admin::fetch_status(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > end {
            anyhow::bail!(
                "{} did not serve http://{addr}/status within {timeout:?} (log: {})",
                p.name,
                p.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `meshfed <args>` to completion in namespace `ns`; its stdout.
pub async fn run_once(ns: Option<&str>, args: &[String]) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find the meshfed binary")?;
    let (program, args) = meshfed_harness::netns::command_in(ns, &exe, args);
    let out = tokio::process::Command::new(program)
        .args(&args)
        .kill_on_drop(true)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "`meshfed {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `meshfed <args>` to completion (in namespace `ns`): its exit code and stdout, whatever
/// the code (for commands whose exit code is an answer, such as `meshfed analyze`).
pub async fn run_any(ns: Option<&str>, args: &[String]) -> anyhow::Result<(i32, String)> {
    let exe = std::env::current_exe().context("cannot find the meshfed binary")?;
    let (program, args) = meshfed_harness::netns::command_in(ns, &exe, args);
    let out = tokio::process::Command::new(program)
        .args(&args)
        .kill_on_drop(true)
        .output()
        .await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}
