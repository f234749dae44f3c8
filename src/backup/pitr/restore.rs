//! `dbpolicy restore`: a data directory that PostgreSQL recovers to a target (the chosen
//! base backup unpacked, `recovery.signal`, `restore_command` calling `dbpolicy backup
//! wal-fetch`, `recovery_target_*`), and `backup verify --pitr`: the same in a scratch
//! directory, started as a throwaway server that must reach the target and be promoted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::base::{self, BaseRecord};
use super::window::{self, Target};
use super::{Catalog, PitrError};
use crate::backup::store::Store;
use crate::backup::tools;

/// What the server does on reaching the target (`recovery_target_action`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Action {
    /// End recovery and accept writes (a new timeline).
    #[default]
    Promote,
    /// Stay read-only in recovery: inspect, then `SELECT pg_wal_replay_resume()`.
    Pause,
    /// Stop the server.
    Shutdown,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Promote => "promote",
            Action::Pause => "pause",
            Action::Shutdown => "shutdown",
        }
    }
}

/// Quotes one word for `/bin/sh` (which runs `restore_command`), and doubles `%`, which
/// PostgreSQL would otherwise expand.
pub(crate) fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''").replace('%', "%%"))
}

/// A `postgresql.conf` string literal.
pub(crate) fn conf_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// The recovery settings, as `postgresql.auto.conf` lines (pure).
pub(crate) fn recovery_settings(
    restore_command: &str,
    target: &Target,
    action: Action,
    base: &str,
) -> String {
    let mut s = format!(
        "\n# Added by `dbpolicy restore` from base backup {base}; remove these lines and\n\
         # recovery.signal's effect is gone once the server is promoted.\n"
    );
    let mut set = |k: &str, v: &str| s.push_str(&format!("{k} = {}\n", conf_literal(v)));
    set("restore_command", restore_command);
    match target {
        Target::Time(t) => set(
            "recovery_target_time",
            &t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
        ),
        Target::Lsn(l) => set("recovery_target_lsn", &l.to_string()),
        Target::Latest => {}
    }
    if !matches!(target, Target::Latest) {
        set("recovery_target_action", action.as_str());
    }
    // The base backup's timeline: a history file archived later (a previous restore
    // that was promoted) must not lead recovery elsewhere.
    set("recovery_target_timeline", "current");
    // The copy must never archive into, nor stream from, what the original used.
    set("archive_mode", "off");
    set("primary_conninfo", "");
    set("primary_slot_name", "");
    s
}

#[derive(Debug, Clone)]
pub(crate) struct Restored {
    pub base: BaseRecord,
    pub dir: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> PitrError {
    move |e| PitrError::Io(format!("{what}: {e}"))
}

/// Unpacks the right base backup into `to` (absent or empty) and configures recovery.
pub(crate) async fn restore(
    store: &Store,
    dir: &str,
    catalog: &Catalog,
    target: &Target,
    to: &Path,
    restore_command: &str,
    action: Action,
) -> Result<Restored, PitrError> {
    let infos: Vec<_> = catalog.bases.iter().map(BaseRecord::info).collect();
    let chosen = window::choose(&infos, &catalog.segments, target)?;
    let record = catalog
        .bases
        .iter()
        .find(|b| b.id == chosen.id)
        .expect("chosen among them")
        .clone();
    if to.exists() {
        let mut rd = std::fs::read_dir(to).map_err(io(format!("reading {}", to.display())))?;
        if rd.next().is_some() {
            return Err(PitrError::Usage(format!(
                "{} is not empty: restore into a new or empty directory",
                to.display()
            )));
        }
    }
    std::fs::create_dir_all(to).map_err(io(format!("creating {}", to.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("chmod {}", to.display())))?;
    let download = tempfile::Builder::new()
        .prefix(".dbpolicy-download-")
        .tempdir_in(to.parent().unwrap_or(Path::new(".")))
        .map_err(io("creating a download directory".into()))?;
    for file in &record.files {
        let local = download.path().join(&file.name);
        base::download(store, dir, file, &local).await?;
        match file.name.as_str() {
            "base.tar.gz" => base::untar_gz(&local, to)?,
            "pg_wal.tar.gz" => base::untar_gz(&local, &to.join("pg_wal"))?,
            _ => {}
        }
        let _ = std::fs::remove_file(&local);
    }
    // A server whose configuration lives outside the data directory (Debian's
    // /etc/postgresql) leaves none in the backup; PostgreSQL needs these files.
    for (name, default) in [
        (
            "postgresql.conf",
            "# written by dbpolicy restore: the backup held none\n",
        ),
        (
            "pg_hba.conf",
            "# written by dbpolicy restore: the backup held none\nlocal all all peer\n",
        ),
        ("pg_ident.conf", ""),
    ] {
        let p = to.join(name);
        if !p.exists() {
            std::fs::write(&p, default).map_err(io(format!("writing {}", p.display())))?;
        }
    }
    let auto = to.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
    text.push_str(&recovery_settings(
        restore_command,
        target,
        action,
        &record.id,
    ));
    std::fs::write(&auto, text).map_err(io(format!("writing {}", auto.display())))?;
    std::fs::write(to.join("recovery.signal"), b"")
        .map_err(io("writing recovery.signal".into()))?;
    Ok(Restored {
        base: record,
        dir: to.to_path_buf(),
    })
}

/// Whether this process runs as root (then servers run as `postgres`).
pub(crate) fn is_root() -> bool {
    // /proc/self belongs to the process's effective user: no unsafe call needed.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The account throwaway servers run as when we are root.
pub(crate) const SERVER_OS_USER: &str = "postgres";

fn as_server_user(program: &Path) -> tokio::process::Command {
    if is_root() {
        let mut c = tokio::process::Command::new(runuser());
        c.args(["-u", SERVER_OS_USER, "--"]).arg(program);
        c
    } else {
        tokio::process::Command::new(program)
    }
}

fn runuser() -> PathBuf {
    ["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("runuser"))
}

#[derive(Debug, Clone)]
pub(crate) struct VerifyOptions {
    pub pg_ctl: Option<PathBuf>,
    /// How long recovery may take.
    pub timeout: Duration,
    /// Keep the scratch directory (printed) instead of deleting it.
    pub keep: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Verified {
    pub base: String,
    pub seconds: f64,
    /// What the server logged about where recovery stopped.
    pub stopped: Option<String>,
    pub scratch: Option<PathBuf>,
}

/// `backup verify --pitr`: restore into a scratch directory, start a throwaway server on
/// a private socket, wait until it has recovered to the target and been promoted (an
/// unreachable target, a missing or corrupt segment make PostgreSQL stop with a FATAL
/// error), stop it.
pub(crate) async fn verify(
    store: &Store,
    dir: &str,
    catalog: &Catalog,
    target: &Target,
    restore_command: &str,
    opts: &VerifyOptions,
) -> Result<Verified, PitrError> {
    let started = std::time::Instant::now();
    let pg_ctl = tools::find("pg_ctl", opts.pg_ctl.as_deref(), None)
        .await
        .map_err(PitrError::FindTool)?;
    let controldata = pg_ctl.path.with_file_name("pg_controldata");
    // /tmp: as root, $TMPDIR may be somewhere the postgres account cannot enter.
    let parent = if is_root() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let scratch_dir = tempfile::Builder::new()
        .prefix("dbpolicy-pitr-verify-")
        .tempdir_in(&parent)
        .map_err(io("creating a scratch directory".into()))?;
    let scratch = scratch_dir.path().to_path_buf();
    let data = scratch.join("data");
    let restored = restore(
        store,
        dir,
        catalog,
        target,
        &data,
        restore_command,
        Action::Promote,
    )
    .await?;
    let mut conf = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap_or_default();
    conf.push_str(&format!(
        "# dbpolicy backup verify --pitr: a private, throwaway server\nport = 5432\nlisten_addresses = ''\nunix_socket_directories = {}\nhot_standby = off\nlogging_collector = off\n",
        conf_literal(&scratch.display().to_string())
    ));
    std::fs::write(data.join("postgresql.auto.conf"), conf)
        .map_err(io("writing postgresql.auto.conf".into()))?;
    if is_root() {
        let out = tokio::process::Command::new("chown")
            .args(["-R", &format!("{SERVER_OS_USER}:")])
            .arg(&scratch)
            .output()
            .await
            .map_err(io("running chown".into()))?;
        if !out.status.success() {
            return Err(PitrError::Io(format!(
                "chown -R {SERVER_OS_USER} {}: {}",
                scratch.display(),
                tools::tail(&out.stderr, 500)
            )));
        }
    }
    let log = scratch.join("server.log");
    let secs = opts.timeout.as_secs().max(1).to_string();
    let out = as_server_user(&pg_ctl.path)
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(["start", "-w", "-t", &secs])
        .current_dir(&scratch)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(io(format!("running {}", pg_ctl.path.display())))?;
    let stop = || async {
        let _ = as_server_user(&pg_ctl.path)
            .arg("-D")
            .arg(&data)
            .args(["stop", "-m", "immediate", "-w"])
            .current_dir(&scratch)
            .stdin(Stdio::null())
            .output()
            .await;
    };
    if !out.status.success() {
        stop().await;
        let log_tail = tools::tail(&std::fs::read(&log).unwrap_or_default(), 3000);
        let kept = keep(scratch_dir, opts.keep);
        return Err(PitrError::VerifyFailed {
            base: restored.base.id,
            reason: format!(
                "the restored server did not recover to {target} ({}). Server log:\n{log_tail}{}",
                out.status,
                kept.map(|p| format!("\n(kept in {})", p.display()))
                    .unwrap_or_default()
            ),
        });
    }
    // pg_ctl -w may return while recovery is still running (hot_standby off): wait for
    // the control file to say "in production", or for the server to stop on a FATAL
    // error (target not reached, WAL missing or corrupt).
    let deadline = started + opts.timeout;
    let (in_production, state_text) = loop {
        let state = tokio::process::Command::new(&controldata)
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io(format!("running {}", controldata.display())))?;
        let text = String::from_utf8_lossy(&state.stdout).into_owned();
        let production = text.lines().any(|l| {
            l.starts_with("Database cluster state:") && l.trim_end().ends_with("in production")
        });
        let running = as_server_user(&pg_ctl.path)
            .arg("-D")
            .arg(&data)
            .arg("status")
            .current_dir(&scratch)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if production || !running || std::time::Instant::now() >= deadline {
            break (production, text);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let log_text = std::fs::read(&log).unwrap_or_default();
    let log_tail = tools::tail(&log_text, 3000);
    stop().await;
    if !in_production {
        let kept = keep(scratch_dir, opts.keep);
        return Err(PitrError::VerifyFailed {
            base: restored.base.id,
            reason: format!(
                "the restored server did not recover to {target} and get promoted within {:?} (pg_controldata: {}). Server log:\n{log_tail}{}",
                opts.timeout,
                state_text.lines().find(|l| l.starts_with("Database cluster state:")).unwrap_or("?"),
                kept.map(|p| format!("\n(kept in {})", p.display())).unwrap_or_default()
            ),
        });
    }
    let log_text = String::from_utf8_lossy(&log_text);
    let stopped = log_text
        .lines()
        .rev()
        .find(|l| {
            l.contains("recovery stopping")
                || l.contains("last completed transaction was at log time")
        })
        .map(|l| {
            l.split_once("LOG:")
                .map_or(l, |(_, m)| m)
                .trim()
                .to_string()
        });
    let scratch_kept = keep(scratch_dir, opts.keep);
    Ok(Verified {
        base: restored.base.id,
        seconds: started.elapsed().as_secs_f64(),
        stopped,
        scratch: scratch_kept,
    })
}

fn keep(dir: tempfile::TempDir, keep: bool) -> Option<PathBuf> {
    keep.then(|| dir.keep())
}

/// Parses `--target-time`: RFC 3339 (`2026-11-25T03:12:00Z`, `…+01:00`) or PostgreSQL's
/// `2026-11-25 03:12:00+00`.
pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>, NotATime> {
    DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| NotATime(s.to_string()))
}

/// `--target-time` text that is not a time with a zone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a time with a zone, like 2026-11-25T03:12:00Z")]
pub(crate) struct NotATime(String);

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn restore_command_words_survive_the_shell_and_percent_expansion() {
        assert_eq!(shell_word("/a b/it's 100%"), "'/a b/it'\\''s 100%%'");
        assert_eq!(conf_literal("it's \\ x"), "'it''s \\\\ x'");
    }

    #[test]
    fn recovery_settings_name_the_target() {
        let t = Utc.with_ymd_and_hms(2026, 11, 25, 3, 12, 0).unwrap();
        let s = recovery_settings("x %f %p", &Target::Time(t), Action::Promote, "B");
        assert!(
            s.contains("recovery_target_time = '2026-11-25 03:12:00.000000+00'"),
            "{s}"
        );
        assert!(s.contains("recovery_target_action = 'promote'"));
        assert!(s.contains("archive_mode = 'off'"));
        let s = recovery_settings("x", &Target::Latest, Action::Pause, "B");
        assert!(!s.contains("recovery_target_action") && !s.contains("recovery_target_time ="));
    }

    #[test]
    fn parses_times() {
        let t = Utc.with_ymd_and_hms(2026, 11, 25, 2, 12, 0).unwrap();
        assert_eq!(parse_time("2026-11-25T03:12:00+01:00").unwrap(), t);
        assert_eq!(parse_time("2026-11-25 02:12:00+00").unwrap(), t);
        assert!(parse_time("2026-11-25 02:12:00").is_err());
        assert!(parse_time("yesterday").is_err());
    }
}
