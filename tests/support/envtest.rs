//! A real Kubernetes API server per test, started through `hack/envtest.sh` (etcd + the
//! upstream CRD server, or the full kube-apiserver 1.20), with `kubectl` helpers.
//!
//! Each [`Envtest`] has its own run directory and random loopback ports, and is stopped
//! when dropped; the script's watchdog also stops it if the test process dies. Binaries
//! come from `hack/envtest.sh setup` (the warm cache in `../shared/envtest-bin`, or a build
//! from Debian's packages); when they cannot be had, the test fails and says why: these
//! tests are never skipped.
//!
//! Environment variables:
//! - `DBPOLICY_ENVTEST_CACHE`: where the binaries are cached (default
//!   `${XDG_CACHE_HOME:-$HOME/.cache}/dbpolicy-envtest`).
//! - `DBPOLICY_KEEP_ENVTEST=1`: leave the servers' run directories (logs, kubeconfig) in
//!   place and print where they are.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Which API server to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiServer {
    /// Upstream apiextensions-apiserver 1.36: CRDs and custom resources only; CEL rules,
    /// strict field validation, status subresource, SSA, watch.
    Crd,
    /// The full kube-apiserver 1.20: Namespaces, Secrets, Events, Leases, RBAC; no CEL, no
    /// server-side field validation, SSA beta, CronJob only as batch/v1beta1.
    Kube,
}

impl ApiServer {
    fn env_value(self) -> &'static str {
        match self {
            ApiServer::Crd => "crd",
            ApiServer::Kube => "kube",
        }
    }
}

/// The repository (this crate is `tests/support` in it).
pub fn repo_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .nth(2)
            .expect("tests/support has two parents")
            .to_path_buf()
    })
}

fn script() -> PathBuf {
    repo_root().join("hack/envtest.sh")
}

fn keep() -> bool {
    std::env::var("DBPOLICY_KEEP_ENVTEST").is_ok_and(|v| v == "1" || v == "true")
}

/// `hack/envtest.sh setup` once per test binary (the script itself serialises concurrent
/// binaries with a lock). Its progress goes straight to the test's stderr.
fn setup(kind: ApiServer) {
    static DONE: OnceLock<Mutex<Vec<ApiServer>>> = OnceLock::new();
    let done = DONE.get_or_init(|| Mutex::new(Vec::new()));
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&kind) {
        return;
    }
    let mut cmd = Command::new("bash");
    cmd.arg(script()).arg("setup");
    if kind == ApiServer::Crd {
        cmd.arg("--crd-only");
    }
    let started = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .unwrap_or_else(|e| panic!("could not run {}: {e}", script().display()));
    assert!(
        status.success(),
        "`hack/envtest.sh setup` failed ({status}) after {:?}: the e2e tests need etcd and \
         the Kubernetes API server binaries. They come from ../shared/envtest-bin beside the \
         repository when present, else they are built from Debian's packages (needs apt-get, \
         dpkg, xz, openssl, curl, python3: hack/install-deps.sh; see the script's header and docs/testing-e2e.md). This test \
         is not skipped on purpose.",
        started.elapsed()
    );
    done.push(kind);
}

/// A running API server (and its etcd), stopped on drop.
pub struct Envtest {
    kind: ApiServer,
    run_dir: PathBuf,
    // Deleted on drop unless DBPOLICY_KEEP_ENVTEST=1.
    _tmp: Option<tempfile::TempDir>,
    kubeconfig: PathBuf,
}

impl Envtest {
    pub fn start(kind: ApiServer) -> Envtest {
        setup(kind);
        // The script picks free ports, but another process can take one before etcd or the
        // API server binds it: a start that lost such a race is retried in a new run dir.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let tmp = tempfile::Builder::new()
                .prefix(&format!("dbpolicy-envtest-{}-", kind.env_value()))
                .tempdir()
                .expect("create a run directory");
            let (run_dir, tmp) = if keep() {
                (tmp.keep(), None)
            } else {
                (tmp.path().to_path_buf(), Some(tmp))
            };
            let out = Command::new("bash")
                .arg(script())
                .arg("start")
                .arg(&run_dir)
                .env("APISERVER", kind.env_value())
                .env("ENVTEST_WATCH_PID", std::process::id().to_string())
                .env("READY_TIMEOUT", "120")
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("could not run {}: {e}", script().display()));
            let kubeconfig = run_dir.join("kubeconfig");
            let env = Envtest {
                kind,
                run_dir,
                _tmp: tmp,
                kubeconfig,
            };
            if out.status.success() {
                return env;
            }
            let msg = text(&out);
            if attempt < ATTEMPTS && msg.contains("address already in use") {
                eprintln!("envtest: a port was taken during start-up, retrying:\n{msg}");
                continue;
            }
            panic!(
                "`hack/envtest.sh start` ({kind:?}) failed: {}\n{msg}",
                out.status
            );
        }
        unreachable!("the last attempt returns or panics")
    }

    pub fn kind(&self) -> ApiServer {
        self.kind
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The last `max_bytes` of the API server's log, for failure messages.
    pub fn log_tail(&self, max_bytes: usize) -> String {
        let log = std::fs::read_to_string(self.run_dir.join("apiserver.log")).unwrap_or_default();
        let start = log.len().saturating_sub(max_bytes);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        log[start..].to_owned()
    }

    /// A `kubectl` command against this server.
    pub fn kubectl_cmd(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env_remove("KUBECTL_EXTERNAL_DIFF")
            .stdin(Stdio::null());
        cmd
    }

    /// Run `kubectl args…` (with `stdin` piped in when given) and return its output.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = self.kubectl_cmd();
        cmd.args(args);
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not run kubectl (is it installed?): {e}"));
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("kubectl stdin");
            pipe.write_all(input.as_bytes())
                .expect("write kubectl stdin");
        }
        child.wait_with_output().expect("wait for kubectl")
    }

    /// `kubectl args…` that must succeed; returns stdout.
    #[track_caller]
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl args…` that must fail; returns stderr (and stdout) for message checks.
    #[track_caller]
    pub fn kubectl_err(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin);
        assert!(
            !out.status.success(),
            "kubectl {} unexpectedly succeeded:\n{}",
            args.join(" "),
            text(&out)
        );
        text(&out)
    }

    /// A kubeconfig that acts as ServiceAccount `ns/name` (a TokenRequest token; needs the
    /// full kube-apiserver), written into the run directory.
    pub fn kubeconfig_for_service_account(&self, ns: &str, name: &str) -> PathBuf {
        let token = self.kubectl_ok(&["create", "token", name, "-n", ns, "--duration=2h"], None);
        let env = std::fs::read_to_string(self.run_dir.join("env")).expect("RUN_DIR/env");
        let url = env
            .lines()
            .find_map(|l| l.strip_prefix("API_URL="))
            .expect("API_URL in RUN_DIR/env");
        let path = self.run_dir.join(format!("kubeconfig-{ns}-{name}"));
        let ca = self.run_dir.join("ca.crt");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {}\ncontexts:\n- name: {name}\n  context: {{cluster: envtest, user: {name}, namespace: {ns}}}\ncurrent-context: {name}\n",
            ca.display(),
            token.trim()
        );
        std::fs::write(&path, text).expect("write the ServiceAccount kubeconfig");
        path
    }

    /// The API server's process id (from `RUN_DIR/apiserver.pid`).
    fn apiserver_pid(&self) -> u32 {
        let pid = std::fs::read_to_string(self.run_dir.join("apiserver.pid"))
            .expect("RUN_DIR/apiserver.pid: the API server was started by this Envtest");
        pid.trim().parse().expect("a pid in RUN_DIR/apiserver.pid")
    }

    /// Stops the API server alone (SIGTERM, SIGKILL after 3 s, waiting until it is gone); etcd keeps running
    /// with the data, so [`restart_apiserver`](Self::restart_apiserver) brings the same
    /// cluster back on the same port. Its command line is kept in `RUN_DIR/apiserver.cmdline`;
    /// the pid file stays, so the watchdog and `stop` go on watching this run directory.
    pub fn stop_apiserver(&self) {
        let pid = self.apiserver_pid();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_else(|e| panic!("the API server (pid {pid}) is not running: {e}"));
        std::fs::write(self.run_dir.join("apiserver.cmdline"), cmdline)
            .expect("write RUN_DIR/apiserver.cmdline");
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}: {status}");
        // It stops listening at once, then drains its watches: three seconds, then SIGKILL.
        let deadline = Instant::now() + Duration::from_secs(3);
        while process_running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if process_running(pid) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        wait_for(Duration::from_secs(10), "the API server exits", || {
            if process_running(pid) {
                Err(format!("pid {pid} still running"))
            } else {
                Ok(())
            }
        });
    }

    /// Starts the API server again with the command line [`stop_apiserver`](Self::stop_apiserver)
    /// saved (same port, certificates, etcd and tokens), appending to `apiserver.log`, and
    /// waits until `/readyz` answers.
    pub fn restart_apiserver(&self) {
        let cmdline = std::fs::read(self.run_dir.join("apiserver.cmdline"))
            .expect("RUN_DIR/apiserver.cmdline: call stop_apiserver first");
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // Started in the background by a shell that exits at once, as `envtest.sh start`
        // does, so the server is not this process's child and its pid goes into the pid file.
        let out = Command::new("bash")
            .arg("-c")
            .arg(r#""$@" < /dev/null >> "$ENVTEST_LOG" 2>&1 & echo $!"#)
            .arg("bash")
            .args(&args)
            .env("ENVTEST_LOG", self.run_dir.join("apiserver.log"))
            .stdin(Stdio::null())
            .output()
            .expect("restart the API server");
        assert!(
            out.status.success(),
            "restart the API server: {}",
            text(&out)
        );
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        std::fs::write(self.run_dir.join("apiserver.pid"), format!("{pid}\n"))
            .expect("write RUN_DIR/apiserver.pid");
        wait_for(
            Duration::from_secs(60),
            "the restarted API server is ready",
            || {
                let out = self.kubectl(&["get", "--raw", "/readyz"], None);
                if out.status.success() {
                    Ok(())
                } else {
                    Err(text(&out))
                }
            },
        );
    }

    /// `hack/envtest.sh install-crds`: the repository's `crds/`, Established. On the
    /// kube-apiserver 1.20 the script leaves out what 1.20 cannot hold (CEL rules, `null`
    /// enum members); the CRD server gets the CRD unchanged.
    pub fn install_crds(&self) {
        let out = Command::new("bash")
            .arg(script())
            .arg("install-crds")
            .arg(&self.run_dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", script().display()));
        assert!(
            out.status.success(),
            "`hack/envtest.sh install-crds` ({:?}) failed: {}\n{}",
            self.kind,
            out.status,
            text(&out)
        );
    }
}

impl Drop for Envtest {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if keep() {
            eprintln!(
                "kept the API server's run directory: {} (kubeconfig, logs)",
                self.run_dir.display()
            );
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // state is the field after the parenthesised command name
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// stdout and stderr of a finished command, for messages.
pub fn text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(&err);
    }
    s
}

/// Poll `f` (blocking) until it returns `Ok`, backing off from 50 ms to 500 ms; panic with
/// the last error after `timeout`.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("{what}: not done within {timeout:?}; last: {last}");
                }
            }
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// A plain HTTP/1.0 GET of `path` on `addr` (the operator's admin server): (status, body).
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response: {out}"))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}
