//! Shared integration-test harness: throwaway PostgreSQL servers (primary and streaming
//! standby), one fresh database per test, the `dbpolicy` binary, policy files and
//! await-with-timeout polling.
//!
//! A crate of its own (`dbpolicy-test-support`, a dev-dependency), compiled once for every
//! test binary; tests say `use dbpolicy_test_support as support;`. It does not depend on
//! dbpolicy. [`envtest`] (a real API server) and [`helm`] are its other modules.
//!
//! Environment variables:
//! - `DBPOLICY_PG_BIN`: directory holding the server binaries `initdb`, `pg_ctl` and
//!   `postgres` of the PostgreSQL version to test (e.g. one installed by
//!   `hack/install-postgres.sh --bin 17`); `pg_basebackup` too for streaming standbys. When
//!   set, [`TestDb::new`] does not use the shared server either (that one runs whatever
//!   version the machine has) but one throwaway server of this version per test binary,
//!   unless `DBPOLICY_TEST_ADMIN_URL` is set too. `PG_BIN` is the older name of the same
//!   variable. Default: the highest Debian `/usr/lib/postgresql/<v>/bin`, then
//!   `pg_config --bindir`, and the shared server.
//! - `DBPOLICY_TEST_ADMIN_URL`: superuser URL of the shared server that [`TestDb::new`]
//!   creates databases on (default `postgres://postgres@127.0.0.1:5432/postgres`). When the
//!   default is unreachable, one throwaway server per test binary is started instead; when
//!   the variable is set explicitly and unreachable, tests fail rather than silently testing
//!   something else.
//! - `DBPOLICY_KEEP_TEST_SERVERS=1`: stop throwaway servers but keep their directories
//!   (data, log) and print where they are.
//! - `DBPOLICY_KEEP_TEST_DBS=1`: keep the database (and roles) of a test that failed, and
//!   print its URL.

pub mod envtest;
pub mod helm;
pub mod moto;

use std::ffi::OsStr;
use std::fmt::{Debug, Write as _};
use std::fs;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection};

/// The superuser every throwaway cluster is initialised with.
const SUPERUSER: &str = "postgres";
/// The unprivileged account servers run as when the tests run as root.
const SERVER_OS_USER: &str = "postgres";
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Generous: a loaded CI machine running many test binaries at once can be slow to
/// initdb/start/replay, and a timeout here only ever turns a hang into a clear failure.
const PG_CTL_TIMEOUT_SECS: &str = "120";
const START_ATTEMPTS: usize = 5;

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

fn keep_servers() -> bool {
    env_flag("DBPOLICY_KEEP_TEST_SERVERS")
}

// ---------------------------------------------------------------------------------------
// PgServer
// ---------------------------------------------------------------------------------------

/// How to start a [`PgServer`].
#[derive(Debug, Clone, Default)]
pub struct PgServerOptions {
    settings: Vec<(String, String)>,
    replication: bool,
    password_auth: bool,
    initdb_args: Vec<String>,
}

impl PgServerOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// An extra server setting, written to `postgresql.conf` (so it survives restarts and
    /// is inherited by standbys cloned from this server).
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Settings a primary needs to feed streaming standbys. PostgreSQL 10+ defaults
    /// already allow it; being explicit keeps standby tests independent of the defaults
    /// and of settings a test adds.
    pub fn replication(mut self) -> Self {
        self.replication = true;
        self
    }

    /// An extra `initdb` argument, e.g. `--wal-segsize=1` (1 MB WAL segments: WAL tests
    /// switch segments without writing 16 MB each time).
    pub fn initdb_arg(mut self, arg: impl Into<String>) -> Self {
        self.initdb_args.push(arg.into());
        self
    }

    /// Require a password (`scram-sha-256`) for TCP connections of every role except the
    /// superuser the harness itself connects as, e.g. to test wrong passwords.
    pub fn password_auth(mut self) -> Self {
        self.password_auth = true;
        self
    }

    fn all_settings(&self) -> Vec<(String, String)> {
        let mut all = Vec::new();
        if self.replication {
            for (k, v) in [
                ("wal_level", "replica"),
                ("max_wal_senders", "10"),
                ("max_replication_slots", "10"),
                ("hot_standby", "on"),
                // Standbys started without a slot must not lose the WAL they still need.
                ("wal_keep_size", "256MB"),
            ] {
                all.push((k.to_owned(), v.to_owned()));
            }
        }
        all.extend(self.settings.iter().cloned());
        all
    }
}

/// A throwaway PostgreSQL cluster in a temporary directory, listening on a free loopback
/// port. Stopped (immediate mode) and deleted on drop.
///
/// A background watchdog process also stops and deletes it once the test process is
/// gone: statics are never dropped and Ctrl-C skips destructors, while `pg_ctl` detaches
/// the postmaster into its own session, so nothing else would stop it.
pub struct PgServer {
    bin: PathBuf,
    /// Temporary directory holding everything below; owned by the server account.
    root: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    port: u16,
    /// `Some(account)` when the binaries must run through `runuser` (we are root).
    run_as: Option<String>,
    running: AtomicBool,
    watchdog: Option<Child>,
}

impl PgServer {
    /// Initialise and start a primary with default options.
    pub fn start() -> PgServer {
        Self::start_with(PgServerOptions::default())
    }

    /// Initialise and start a primary.
    pub fn start_with(opts: PgServerOptions) -> PgServer {
        let mut server = Self::prepare("dbpolicy-pg-");
        let data = server.data.clone();
        let mut initdb = server.command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", SUPERUSER, "--no-sync", "-E", "UTF8"])
            // Otherwise initdb takes the locale from the environment, which differs between
            // developer machines and minimal CI images.
            .arg("--no-locale")
            .args(&opts.initdb_args);
        run_checked(&mut initdb, "initdb");
        server.ensure_replication_hba();
        if opts.password_auth {
            server.require_passwords();
        }
        server.append_settings(&opts.all_settings());
        server.launch();
        server
    }

    /// Start a server on an existing data directory (e.g. one a restore assembled): it is
    /// moved into a throwaway directory, handed to the server account and started there,
    /// with the usual cleanup.
    pub fn adopt(data: &Path) -> PgServer {
        let mut server = Self::prepare("dbpolicy-pg-adopted-");
        fs::rename(data, &server.data).unwrap_or_else(|e| {
            panic!(
                "move {} into {}: {e}",
                data.display(),
                server.data.display()
            )
        });
        if let Some(user) = &server.run_as {
            run_checked(
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{user}:"))
                    .arg(&server.data),
                "chown",
            );
        }
        fs::set_permissions(&server.data, fs::Permissions::from_mode(0o700))
            .expect("chmod the data directory");
        server.launch();
        server
    }

    /// Clone this (running) server with `pg_basebackup -R -X stream` and start the copy as
    /// a hot streaming standby on its own port. The standby inherits the primary's
    /// `postgresql.conf`, which hot standby requires for settings such as
    /// `max_connections`.
    pub fn start_standby(&self) -> PgServer {
        self.standby(None)
    }

    /// Like [`start_standby`](Self::start_standby), streaming through an existing
    /// physical replication slot on the primary (`primary_slot_name`).
    pub fn start_standby_using_slot(&self, slot: &str) -> PgServer {
        self.standby(Some(slot))
    }

    fn standby(&self, slot: Option<&str>) -> PgServer {
        assert!(
            self.is_running(),
            "start_standby: the primary is not running"
        );
        assert!(
            self.bin.join("pg_basebackup").is_file(),
            "start_standby: {} has no pg_basebackup (the npm builds of PostgreSQL 16+ ship \
             only the server), and Debian's older pg_basebackup cannot clone a newer server: \
             standby tests run on the default PostgreSQL only (unset DBPOLICY_PG_BIN)",
            self.bin.display()
        );
        let mut standby = Self::prepare("dbpolicy-pg-standby-");
        let data = standby.data.clone();
        let port = self.port.to_string();
        let mut basebackup = standby.command("pg_basebackup");
        basebackup
            .args(["-h", "127.0.0.1", "-p", &port, "-U", SUPERUSER, "-D"])
            .arg(&data)
            // A spread checkpoint would make every standby test wait for
            // checkpoint_completion_target of checkpoint_timeout.
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"]);
        if let Some(slot) = slot {
            basebackup.args(["-S", slot]);
        }
        run_checked(&mut basebackup, "pg_basebackup");
        standby.launch();
        standby
    }

    /// `postgres://postgres@127.0.0.1:PORT/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Superuser URL of the `postgres` database.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log (`pg_ctl -l`), useful in assertion messages.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `max_bytes` of the server log.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        let log = fs::read(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(max_bytes);
        String::from_utf8_lossy(&log[start..]).into_owned()
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// A superuser connection to the `postgres` database.
    pub async fn connect(&self) -> PgConnection {
        let url = self.admin_url();
        PgConnection::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connect to {url}: {}", describe(&e)))
    }

    /// Stop (fast mode) and start again on the same port, so URLs stay valid; starts a
    /// stopped server. Needed for settings with `context = postmaster`.
    pub fn restart(&self) {
        if self.is_running() {
            self.stop();
        }
        if let Err(e) = self.try_start(self.port) {
            panic!("restart of the server on port {}: {e}", self.port);
        }
    }

    /// Stop the server (fast mode: sessions are disconnected, a clean shutdown checkpoint
    /// is written).
    pub fn stop(&self) {
        let out = self.pg_ctl(["stop", "-m", "fast", "-w", "-t", PG_CTL_TIMEOUT_SECS]);
        assert!(
            out.status.success(),
            "pg_ctl stop failed:\n{}",
            output_text(&out)
        );
        self.running.store(false, Ordering::SeqCst);
    }

    /// Run `pg_ctl -D <data> -l <log> <args…>` as the server account (e.g. `["promote",
    /// "-w"]`, `["reload"]`). `-l` is always given so that a `start` never hands our
    /// output pipe to the postmaster, which would block this call until the server exits.
    /// The running state tracked for [`Drop`] is not updated: use `stop`/`restart` for
    /// that.
    pub fn pg_ctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
    }

    /// Create the temporary directory layout, owned by the server account. Returns a
    /// server that is not running yet; dropping it (e.g. when initdb panics) cleans up.
    fn prepare(prefix: &str) -> PgServer {
        let bin = pg_bin_dir();
        let run_as = is_root().then(|| SERVER_OS_USER.to_owned());
        // As root, $TMPDIR may point somewhere the server account cannot reach (e.g. under
        // /root); /tmp is world-traversable by convention.
        let parent = if run_as.is_some() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let root = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&parent)
            .unwrap_or_else(|e| panic!("create a temp directory in {}: {e}", parent.display()))
            .keep();
        let mut server = PgServer {
            bin,
            data: root.join("data"),
            socket_dir: root.join("sock"),
            log: root.join("postgres.log"),
            root,
            port: 0,
            run_as,
            running: AtomicBool::new(false),
            watchdog: None,
        };
        fs::create_dir(&server.socket_dir).expect("create the socket directory");
        fs::File::create(&server.log).expect("create the server log");
        if let Some(user) = &server.run_as {
            let (uid, gid) = os_user_ids(user);
            for path in [&server.root, &server.socket_dir, &server.log] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("chown {} to {user}: {e}", path.display()));
            }
        }
        fs::set_permissions(&server.root, fs::Permissions::from_mode(0o700))
            .expect("chmod the server directory");
        server.watchdog = server.spawn_watchdog();
        server
    }

    /// A command for one of the PostgreSQL binaries, run as the server account.
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut cmd = Command::new(runuser_path());
                cmd.args(["-u", user, "--"]).arg(exe);
                cmd
            }
            None => Command::new(exe),
        };
        // The server account may not be able to enter the test's working directory.
        cmd.current_dir(&self.root).stdin(Stdio::null());
        // libpq/pg_ctl read these; a developer's shell must not redirect our commands.
        for var in [
            "PGHOST",
            "PGHOSTADDR",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
            "PGPASSWORD",
            "PGSERVICE",
            "PGDATA",
            "PGOPTIONS",
            "PGSSLMODE",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Start the postmaster, choosing a new free port on each attempt: between finding a
    /// free port and binding it, a concurrently starting server may take it.
    fn launch(&mut self) {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match self.try_start(port) {
                Ok(()) => {
                    self.port = port;
                    return;
                }
                Err(e) if e.contains("already in use") => last_error = e,
                Err(e) => panic!("could not start PostgreSQL: {e}"),
            }
        }
        panic!("could not start PostgreSQL after {START_ATTEMPTS} attempts: {last_error}");
    }

    fn try_start(&self, port: u16) -> Result<(), String> {
        let log_before = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0) as usize;
        // Paths from tempfile contain no spaces, so pg_ctl's shell-word splitting of -o is
        // safe here; user settings go through postgresql.conf instead.
        let options = self.postmaster_options(port);
        let out = self.pg_ctl(["start", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-o", &options]);
        if out.status.success() {
            self.running.store(true, Ordering::SeqCst);
            return Ok(());
        }
        let log = fs::read(&self.log).unwrap_or_default();
        let new_log = String::from_utf8_lossy(log.get(log_before..).unwrap_or_default());
        Err(format!(
            "pg_ctl start on port {port} failed:\n{}\nserver log:\n{new_log}",
            output_text(&out)
        ))
    }

    /// Command-line options of the postmaster. The port lives here rather than in
    /// `postgresql.conf` so that a standby cloned from this data directory does not
    /// inherit it.
    fn postmaster_options(&self, port: u16) -> String {
        format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.socket_dir.display()
        )
    }

    /// initdb's trust default already has `host replication all 127.0.0.1/32`; add it if a
    /// different sample file lacks it, since standbys stream over TCP.
    fn ensure_replication_hba(&self) {
        let hba = self.data.join("pg_hba.conf");
        let text = fs::read_to_string(&hba).expect("read pg_hba.conf");
        let present = text.lines().any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() >= 5 && f[0] == "host" && f[1] == "replication" && f[3] == "127.0.0.1/32"
        });
        if !present {
            append(&hba, "host replication all 127.0.0.1/32 trust\n");
        }
    }

    /// pg_hba.conf takes the first matching line: these go before initdb's trust lines.
    fn require_passwords(&self) {
        let hba = self.data.join("pg_hba.conf");
        let text = fs::read_to_string(&hba).expect("read pg_hba.conf");
        let lines = format!(
            "host all {SUPERUSER} 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        );
        fs::write(&hba, lines + &text).expect("write pg_hba.conf");
    }

    fn append_settings(&self, settings: &[(String, String)]) {
        if settings.is_empty() {
            return;
        }
        let mut text = String::from("\n# added by the dbpolicy test harness\n");
        for (name, value) in settings {
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'),
                "invalid setting name {name:?}"
            );
            let _ = writeln!(text, "{name} = '{}'", value.replace('\'', "''"));
        }
        append(&self.data.join("postgresql.conf"), &text);
    }

    /// See the type's documentation. `sh` polls the test process once a second; the
    /// process group of its own keeps a terminal's Ctrl-C from killing it together with
    /// the tests it must clean up after.
    fn spawn_watchdog(&self) -> Option<Child> {
        const SCRIPT: &str = r#"
parent=$1; root=$2; keep=$3; shift 3
while kill -0 "$parent" 2>/dev/null; do sleep 1; done
"$@" >/dev/null 2>&1
[ "$keep" = 1 ] || rm -rf "$root"
"#;
        let stop = self.command("pg_ctl");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", SCRIPT, "dbpolicy-pg-watchdog"])
            .arg(std::process::id().to_string())
            .arg(&self.root)
            .arg(if keep_servers() { "1" } else { "0" })
            .arg(stop.get_program())
            .args(stop.get_args())
            .arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", "immediate", "-w"])
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        match cmd.spawn() {
            Ok(child) => Some(child),
            Err(e) => {
                eprintln!(
                    "warning: no cleanup watchdog for {}: {e}",
                    self.root.display()
                );
                None
            }
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.is_running() {
            // Immediate: nothing in a throwaway cluster is worth a shutdown checkpoint.
            let out = self.pg_ctl(["stop", "-m", "immediate", "-w", "-t", PG_CTL_TIMEOUT_SECS]);
            if !out.status.success() {
                eprintln!(
                    "warning: stopping test server failed:\n{}",
                    output_text(&out)
                );
            }
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if keep_servers() {
            eprintln!(
                "DBPOLICY_KEEP_TEST_SERVERS: kept stopped test server in {} (log: {}); \
                 start it again with: {}pg_ctl -D {} -l {} -o '{}' start",
                self.root.display(),
                self.log.display(),
                match &self.run_as {
                    Some(user) => format!("runuser -u {user} -- {}/", self.bin.display()),
                    None => format!("{}/", self.bin.display()),
                },
                self.data.display(),
                self.log.display(),
                self.postmaster_options(self.port),
            );
        } else if let Err(e) = fs::remove_dir_all(&self.root) {
            eprintln!("warning: could not remove {}: {e}", self.root.display());
        }
    }
}

/// The server binaries chosen through the environment: `DBPOLICY_PG_BIN`, or the older
/// `PG_BIN`; empty values count as unset.
fn pg_bin_from_env() -> Option<(&'static str, PathBuf)> {
    ["DBPOLICY_PG_BIN", "PG_BIN"].into_iter().find_map(|var| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(|dir| (var, PathBuf::from(dir)))
    })
}

/// Major version of the server binaries the harness starts (`postgres --version`), e.g. 17.
pub fn pg_bin_major() -> u32 {
    let exe = pg_bin_dir().join("postgres");
    let out = Command::new(&exe)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("could not run {} --version: {e}", exe.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    // "postgres (PostgreSQL) 17.10", "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)"
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("{} --version printed {text:?}", exe.display()))
}

/// Whether the binaries were chosen through `DBPOLICY_PG_BIN` (or `PG_BIN`), in which case
/// [`TestDb::new`] runs on a throwaway server of that version.
pub fn pg_bin_chosen() -> bool {
    pg_bin_from_env().is_some()
}

/// Directory of the PostgreSQL server binaries.
fn pg_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let has_tools = |dir: &Path| {
            ["initdb", "pg_ctl", "pg_basebackup"]
                .iter()
                .all(|b| dir.join(b).is_file())
        };
        if let Some((var, dir)) = pg_bin_from_env() {
            let missing: Vec<&str> = ["initdb", "pg_ctl", "postgres"]
                .into_iter()
                .filter(|b| !dir.join(b).is_file())
                .collect();
            assert!(
                missing.is_empty(),
                "{var}={} lacks {missing:?}: point it at a PostgreSQL bin directory \
                 (hack/install-postgres.sh --bin <major> prints one)",
                dir.display()
            );
            return dir;
        }
        // Debian installs each major version side by side; use the newest.
        let newest = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version: u32 = e.file_name().to_str()?.parse().ok()?;
                Some((version, e.path().join("bin")))
            })
            .filter(|(_, bin)| has_tools(bin))
            .max_by_key(|(version, _)| *version);
        if let Some((_, bin)) = newest {
            return bin;
        }
        let from_pg_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        if let Some(bin) = from_pg_config.filter(|bin| has_tools(bin)) {
            return bin;
        }
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) not found in $PG_BIN, \
             /usr/lib/postgresql/<version>/bin or `pg_config --bindir`.\n\
             Install them with `apt-get install postgresql` (Debian/Ubuntu; the service \
             need not run), or set PG_BIN to the directory that holds them."
        )
    })
    .clone()
}

fn is_root() -> bool {
    // The effective uid is the second field of `Uid:`; avoids a libc dependency.
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            if let Some(euid) = line.split_whitespace().nth(2) {
                return euid == "0";
            }
        }
    }
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn os_user_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, user])
            .output()
            .unwrap_or_else(|e| panic!("run `id {flag} {user}`: {e}"));
        assert!(
            out.status.success(),
            "tests run as root, so PostgreSQL must run as the unprivileged account \
             {user:?}, which does not exist (installing the `postgresql` package creates \
             it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("`id {flag} {user}` printed no number: {e}"))
    };
    (id("-u"), id("-g"))
}

fn runuser_path() -> PathBuf {
    // cargo may run with a PATH that lacks the sbin directories.
    [
        "/usr/sbin/runuser",
        "/sbin/runuser",
        "/usr/bin/runuser",
        "/bin/runuser",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .unwrap_or_else(|| PathBuf::from("runuser"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

fn append(path: &Path, text: &str) {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

fn run_checked(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {what} ({cmd:?}): {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({cmd:?}):\n{}",
        output_text(&out)
    );
    out
}

fn output_text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------
// TestDb
// ---------------------------------------------------------------------------------------

/// A fresh, uniquely named database for one test, dropped (`WITH (FORCE)`) on drop along
/// with the roles registered through [`unique_role`](Self::unique_role) /
/// [`track_role`](Self::track_role): roles are cluster-wide, so tests sharing a server
/// must neither reuse role names nor leave roles behind.
pub struct TestDb {
    admin_url: String,
    name: String,
    url: String,
    /// `<pid>_<counter>_<random>`, shared by the database name and unique role names.
    tag: String,
    roles: Mutex<Vec<String>>,
}

impl TestDb {
    /// A database on the shared server (see the module documentation).
    pub async fn new() -> TestDb {
        Self::create(shared_admin_url().to_owned()).await
    }

    /// A database on the given server.
    pub async fn on(server: &PgServer) -> TestDb {
        Self::create(server.admin_url()).await
    }

    async fn create(admin_url: String) -> TestDb {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
        // The random part keeps names unique across test processes whose pids were
        // reused (e.g. databases kept by DBPOLICY_KEEP_TEST_DBS).
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let tag = format!(
            "{}_{counter}_{:06x}",
            std::process::id(),
            random & 0xff_ffff
        );
        let name = format!("dbpolicy_t_{tag}");
        let url = url_with_database(&admin_url, &name);
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connect to {admin_url}: {}", describe(&e)));
        // template0 accepts no connections, so concurrent CREATE DATABASEs never fail with
        // "source database is being accessed by other users", and nothing installed in
        // template1 leaks into tests.
        let sql = format!(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'",
            quote_ident(&name)
        );
        sqlx::raw_sql(&sql)
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
        let _ = admin.close().await;
        TestDb {
            admin_url,
            name,
            url,
            tag,
            roles: Mutex::new(Vec::new()),
        }
    }

    /// Superuser URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Superuser URL of the maintenance database of the server this database lives on.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// URL of this database for another role (no password: the test servers trust
    /// loopback connections).
    pub fn url_as(&self, role: &str) -> String {
        url_with_user(&self.url, role)
    }

    /// `<base>_<unique tag>`, dropped when this `TestDb` is dropped. Does not create it.
    pub fn unique_role(&self, base: &str) -> String {
        let role = format!("{base}_{}", self.tag);
        assert!(
            role.len() <= 63,
            "role name {role:?} exceeds PostgreSQL's 63 bytes"
        );
        self.track_role(&role);
        role
    }

    /// Drop `role` (if it exists) together with this database, e.g. a role whose name a
    /// policy fixture fixes.
    pub fn track_role(&self, role: &str) {
        self.roles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(role.to_owned());
    }

    /// A new single connection as the superuser.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {}", self.url, describe(&e)))
    }

    /// A new small pool (each call makes a new one; close or drop it when done).
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("pool for {}: {}", self.url, describe(&e)))
    }

    /// Run a script of one or more statements (simple query protocol, so no bind
    /// parameters); panics with the SQLSTATE on error.
    pub async fn exec(&self, sql: &str) {
        if let Err(e) = self.try_exec(sql).await {
            panic!("SQL failed on {}: {}\n{sql}", self.name, describe(&e));
        }
    }

    /// Like [`exec`](Self::exec), returning the error, for tests that expect one.
    pub async fn try_exec(&self, sql: &str) -> Result<(), sqlx::Error> {
        let mut conn = PgConnection::connect(&self.url).await?;
        let result = sqlx::raw_sql(sql).execute(&mut conn).await.map(drop);
        let _ = conn.close().await;
        result
    }

    /// The single value of a one-row, one-column query.
    pub async fn query_scalar<T>(&self, sql: &str) -> T
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        let mut conn = self.connect().await;
        let value = sqlx::query_scalar::<_, T>(sql)
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("query failed on {}: {}\n{sql}", self.name, describe(&e)));
        let _ = conn.close().await;
        value
    }

    /// The first column of every row.
    pub async fn query_column<T>(&self, sql: &str) -> Vec<T>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        let mut conn = self.connect().await;
        let values = sqlx::query_scalar::<_, T>(sql)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("query failed on {}: {}\n{sql}", self.name, describe(&e)));
        let _ = conn.close().await;
        values
    }

    /// All rows, for assertions on several columns (`row.get::<T, _>("col")`).
    pub async fn query_rows(&self, sql: &str) -> Vec<PgRow> {
        let mut conn = self.connect().await;
        let rows = sqlx::query(sql)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("query failed on {}: {}\n{sql}", self.name, describe(&e)));
        let _ = conn.close().await;
        rows
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let roles = std::mem::take(self.roles.get_mut().unwrap_or_else(|e| e.into_inner()));
        if std::thread::panicking() && env_flag("DBPOLICY_KEEP_TEST_DBS") {
            eprintln!(
                "DBPOLICY_KEEP_TEST_DBS: kept database {} (roles: {roles:?})",
                self.url
            );
            return;
        }
        let drop_db = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&self.name)
        );
        // Drop cannot await, and may run inside (or outside) any runtime: do the work on a
        // thread of its own with a private runtime. Failures are reported, never raised:
        // a panic while a failed test unwinds would abort the whole test binary.
        let result = block_on_thread(|| async {
            let mut admin = PgConnection::connect(&self.admin_url).await?;
            sqlx::raw_sql(&drop_db).execute(&mut admin).await?;
            for role in &roles {
                let sql = format!("DROP ROLE IF EXISTS {}", quote_ident(role));
                if let Err(e) = sqlx::raw_sql(&sql).execute(&mut admin).await {
                    eprintln!("warning: {sql}: {}", describe(&e));
                }
            }
            let _ = admin.close().await;
            Ok::<(), sqlx::Error>(())
        });
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!(
                "warning: dropping test database {}: {}",
                self.name,
                describe(&e)
            ),
            Err(e) => eprintln!("warning: dropping test database {}: {e}", self.name),
        }
    }
}

/// Superuser URL of the shared server, decided once per test binary.
fn shared_admin_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    static FALLBACK: OnceLock<PgServer> = OnceLock::new();
    URL.get_or_init(|| {
        let explicit = std::env::var("DBPOLICY_TEST_ADMIN_URL")
            .ok()
            .filter(|u| !u.is_empty());
        if explicit.is_none() {
            if let Some((var, dir)) = pg_bin_from_env() {
                // The shared server runs the machine's version, not the one under test.
                let server = FALLBACK.get_or_init(PgServer::start);
                eprintln!(
                    "note: {var}={}: this test binary uses its own PostgreSQL on port {}",
                    dir.display(),
                    server.port()
                );
                return server.admin_url();
            }
        }
        let url = explicit
            .clone()
            .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_owned());
        let probe = block_on_thread(|| async {
            let connect = async {
                let mut conn = PgConnection::connect(&url).await?;
                sqlx::query_scalar::<_, i32>("SELECT 1")
                    .fetch_one(&mut conn)
                    .await?;
                conn.close().await
            };
            match tokio::time::timeout(Duration::from_secs(5), connect).await {
                Ok(result) => result.map_err(|e| describe(&e)),
                Err(_) => Err("timed out after 5s".to_owned()),
            }
        });
        match probe.and_then(|r| r) {
            Ok(()) => url,
            Err(e) if explicit.is_some() => {
                panic!("DBPOLICY_TEST_ADMIN_URL={url} is not reachable: {e}")
            }
            Err(e) => {
                let server = FALLBACK.get_or_init(PgServer::start);
                eprintln!(
                    "note: {url} is not reachable ({e}); this test binary uses its own \
                     PostgreSQL on port {} instead",
                    server.port()
                );
                server.admin_url()
            }
        }
    })
}

/// Run the future `make` returns to completion on a new thread with its own
/// current-thread runtime, so that it works from synchronous code called inside an async
/// test (where `block_on` on the caller's thread would panic) as well as outside any
/// runtime. The future is built on that thread, so it need not be `Send` (sqlx futures
/// borrowing a connection often are not, as far as the compiler can prove).
fn block_on_thread<M, Fut>(make: M) -> Result<Fut::Output, String>
where
    M: FnOnce() -> Fut + Send,
    Fut: Future,
    Fut::Output: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| rt.block_on(make()))
                    .map_err(|e| format!("could not build a tokio runtime: {e}"))
            })
            .join()
            .unwrap_or_else(|_| Err("the helper thread panicked".to_owned()))
    })
}

/// `sqlx::Error` with the SQLSTATE when there is one, which is what tests assert on.
pub fn describe(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(db) => format!(
            "{} (SQLSTATE {})",
            db.message(),
            db.code().as_deref().unwrap_or("?")
        ),
        None => e.to_string(),
    }
}

/// SQLSTATE of a database error, e.g. `42501` for insufficient privilege.
pub fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|db| db.code())
        .map(|c| c.into_owned())
}

pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `url` with its database (the path) replaced by `db`; the query stays. The same as
/// `dbpolicy::pg::url_with_database`, which this crate does not depend on.
pub fn url_with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{}", &base[..path_start], percent_encode(db));
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const URI_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes everything but unreserved characters, for URI parts (as
/// `dbpolicy::pg::percent_encode`).
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, URI_COMPONENT).to_string()
}

/// Replace the user (and drop any password) of a libpq URI.
pub fn url_with_user(url: &str, user: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[authority_start..]
        .find(['/', '?'])
        .map_or(url.len(), |i| authority_start + i);
    let host_start = url[authority_start..authority_end]
        .rfind('@')
        .map_or(authority_start, |i| authority_start + i + 1);
    format!(
        "{}{}@{}",
        &url[..authority_start],
        percent_encode(user),
        &url[host_start..]
    )
}

// ---------------------------------------------------------------------------------------
// The dbpolicy binary and its inputs
// ---------------------------------------------------------------------------------------

/// The `dbpolicy` binary cargo built beside the test binary. `cargo test` says where
/// (`CARGO_BIN_EXE_dbpolicy`, at run time); a test executable run directly (hack/test.sh's
/// matrix) finds it in its profile directory, one level above `deps/`. (`env!` cannot
/// say it: this crate is not the package's integration test.)
pub fn dbpolicy_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("CARGO_BIN_EXE_dbpolicy") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .map(|profile| profile.join("dbpolicy"))
            .filter(|bin| bin.is_file());
        bin.unwrap_or_else(|| {
            panic!(
                "no dbpolicy binary beside {} (build it with `cargo test --no-run`, or run the test through cargo)",
                exe.display()
            )
        })
    })
}

/// The `dbpolicy` binary built for these tests, without the developer's `DATABASE_URL`
/// (tests pass the URL they mean explicitly).
pub fn dbpolicy_cmd() -> Command {
    let mut cmd = Command::new(dbpolicy_bin());
    cmd.env_remove("DATABASE_URL").stdin(Stdio::null());
    cmd
}

/// What a `dbpolicy` run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Exit code; a run killed by a signal panics in [`run_dbpolicy`] instead.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Run `dbpolicy <args>` with `DATABASE_URL=url` (when given) and collect its output.
/// Blocks the calling thread; from an async test that also serves something the binary
/// talks to, use [`run_dbpolicy_async`].
pub fn run_dbpolicy<I, S>(args: I, url: Option<&str>) -> RunOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = dbpolicy_cmd();
    cmd.args(args);
    if let Some(url) = url {
        cmd.env("DATABASE_URL", url);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    run_output(&format!("{cmd:?}"), out)
}

/// [`run_dbpolicy`] without blocking the runtime, killed after `timeout`.
pub async fn run_dbpolicy_async<I, S>(args: I, url: Option<&str>, timeout: Duration) -> RunOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = dbpolicy_cmd();
    cmd.args(args);
    if let Some(url) = url {
        cmd.env("DATABASE_URL", url);
    }
    let description = format!("{cmd:?}");
    let mut child = tokio::process::Command::from(cmd);
    // A timed-out run must not outlive the test.
    child.kill_on_drop(true);
    let out = match tokio::time::timeout(timeout, child.output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("could not run {description}: {e}")),
        Err(_) => panic!("{description} did not finish within {timeout:?}"),
    };
    run_output(&description, out)
}

fn run_output(description: &str, out: Output) -> RunOutput {
    let code = out.status.code().unwrap_or_else(|| {
        panic!(
            "{description} was killed ({}):\n{}",
            out.status,
            output_text(&out)
        )
    });
    RunOutput {
        code,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A policy file for the CLI, deleted when the returned handle is dropped.
pub fn write_policy(yaml: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .prefix("dbpolicy-policy-")
        .suffix(".yaml")
        .tempfile()
        .expect("create a policy file");
    file.write_all(yaml.as_bytes())
        .expect("write the policy file");
    file.flush().expect("flush the policy file");
    file
}

// ---------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------

/// Poll `f` until it returns `Ok`, backing off from 10 ms to 250 ms between attempts, and
/// return its value; panic with the last error after `timeout`. An attempt that hangs is
/// cut off at the deadline too.
///
/// ```ignore
/// let n: i64 = eventually(Duration::from_secs(10), || async {
///     let n = standby_count().await;
///     if n == 1 { Ok(n) } else { Err(format!("{n} rows so far")) }
/// }).await;
/// ```
pub async fn eventually<F, Fut, T, E>(timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Debug,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(remaining, f()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(e)) => format!("{e:?}"),
            Err(_) => "the last attempt was still running at the deadline".to_owned(),
        };
        let now = Instant::now();
        if now >= deadline {
            panic!("condition not met within {timeout:?} ({attempts} attempts); last: {last}");
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------
// Policies through the CLI
// ---------------------------------------------------------------------------------------

/// A DatabasePolicy document with `spec_body` (YAML lines indented by two spaces, without
/// the `database:` entry) under `spec`.
pub fn policy(name: &str, spec_body: &str) -> String {
    format!(
        "apiVersion: dbpolicy.dev/v1alpha1\nkind: DatabasePolicy\nmetadata:\n  name: {name}\n  namespace: tests\nspec:\n  database:\n    connectionSecretRef: {{name: db}}\n{spec_body}"
    )
}

/// `dbpolicy <verb> -f <policy>` against `url`.
pub fn cli(verb: &str, url: &str, policy_yaml: &str) -> RunOutput {
    let file = write_policy(policy_yaml);
    let path = file.path().to_str().expect("utf-8 temp path").to_string();
    run_dbpolicy([verb, "-f", path.as_str()], Some(url))
}

/// Asserts the exit code, showing the output when it differs.
#[track_caller]
pub fn expect_code(out: &RunOutput, code: i32) {
    assert_eq!(
        out.code, code,
        "unexpected exit code\n--- stdout\n{}\n--- stderr\n{}",
        out.stdout, out.stderr
    );
}

/// `dbpolicy apply -f <policy>` against `url` in the background, killed after `timeout`;
/// the policy file lives as long as the run.
pub fn spawn_apply(
    policy_yaml: &str,
    url: &str,
    timeout: Duration,
) -> tokio::task::JoinHandle<RunOutput> {
    let file = write_policy(policy_yaml);
    let url = url.to_string();
    tokio::spawn(async move {
        let path = file.path().to_str().expect("utf-8 temp path").to_string();
        run_dbpolicy_async(["apply", "-f", path.as_str()], Some(&url), timeout).await
    })
}
