//! `hack/envtest.sh` itself: `start` prints the KUBECONFIG line and serves, `stop` leaves no
//! process behind, and the watchdog stops the servers when the watched process is gone (so
//! a test run that is killed leaves nothing running).

use dbpolicy_test_support::envtest as support_envtest;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support_envtest::{repo_root, text, wait_for};

fn script() -> std::path::PathBuf {
    repo_root().join("hack/envtest.sh")
}

/// Stops the servers of a run directory when dropped, so a failed check leaves nothing.
struct StopOnDrop(std::path::PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.0)
            .output();
    }
}

fn pid(run: &Path, name: &str) -> u32 {
    std::fs::read_to_string(run.join(format!("{name}.pid")))
        .unwrap_or_else(|e| panic!("{name}.pid: {e}"))
        .trim()
        .parse()
        .expect("a pid")
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by init) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

#[test]
fn start_serves_and_stop_and_the_watchdog_leave_nothing_running() {
    // Binaries first (a no-op when cached), through the same helper as the e2e tests.
    drop(support_envtest::Envtest::start(
        support_envtest::ApiServer::Crd,
    ));

    // start / stop.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let _guard = StopOnDrop(run.clone());
    let out = Command::new("bash")
        .arg(script())
        .arg("start")
        .arg(&run)
        .env("APISERVER", "crd")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        format!("export KUBECONFIG={}/kubeconfig", run.display())
    );
    let (etcd, api) = (pid(&run, "etcd"), pid(&run, "apiserver"));
    let version = Command::new("kubectl")
        .args(["version", "-o", "json"])
        .env("KUBECONFIG", run.join("kubeconfig"))
        .output()
        .unwrap();
    assert!(version.status.success(), "{}", text(&version));
    assert!(String::from_utf8_lossy(&version.stdout).contains("serverVersion"));
    let stop = Command::new("bash")
        .arg(script())
        .arg("stop")
        .arg(&run)
        .output()
        .unwrap();
    assert!(stop.status.success(), "{}", text(&stop));
    assert!(
        !alive(etcd) && !alive(api),
        "stop left etcd or the API server running"
    );

    // The watchdog: the watched shell exits right after start.
    let run = dir.path().join("watched");
    let _guard2 = StopOnDrop(run.clone());
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#"ENVTEST_WATCH_PID=$$ APISERVER=crd bash "$0" start "$1" >/dev/null"#)
        .arg(script())
        .arg(&run)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let (etcd, api) = (pid(&run, "etcd"), pid(&run, "apiserver"));
    wait_for(
        Duration::from_secs(30),
        "the watchdog stops the servers",
        || {
            if alive(etcd) || alive(api) {
                Err(format!(
                    "etcd alive: {}, apiserver alive: {}",
                    alive(etcd),
                    alive(api)
                ))
            } else {
                Ok(())
            }
        },
    );
}
