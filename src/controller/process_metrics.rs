//! The standard `process_*` metrics (CPU, memory, file descriptors, threads, start time),
//! read from `/proc/self` at each scrape: prometheus-client has no process collector, and
//! the names are those every Prometheus client library exports, so the usual dashboards
//! and alerts work unchanged. Elsewhere than Linux nothing is exported.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// `/proc` reports CPU times in USER_HZ clock ticks, 100 per second on every Linux
/// architecture the image is built for (the kernel scales its internal HZ to it).
const USER_HZ: f64 = 100.0;

/// One reading of the process.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: Option<i64>,
    pub virtual_bytes: Option<i64>,
    pub threads: Option<i64>,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<i64>,
    pub max_fds: Option<i64>,
}

/// Parses `/proc/self/stat`, `/proc/self/status`, `/proc/stat` (boot time) and
/// `/proc/self/limits`; a missing or odd field is left out, never guessed.
pub(crate) fn parse(stat: &str, status: &str, proc_stat: &str, limits: &str) -> ProcessStats {
    let mut s = ProcessStats::default();
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // `rest` starts at field 3 (state): field N is fields[N - 3].
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        s.cpu_seconds = (utime + stime) / USER_HZ;
    }
    let boot = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        s.start_time_seconds = Some(boot + start / USER_HZ);
    }
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<i64>().ok())
    };
    s.resident_bytes = kib("VmRSS:").map(|k| k * 1024);
    s.virtual_bytes = kib("VmSize:").map(|k| k * 1024);
    s.threads = kib("Threads:");
    s.max_fds = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<i64>().ok());
    s
}

fn read() -> Option<ProcessStats> {
    let text = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let mut s = parse(
        &stat,
        &text("/proc/self/status"),
        &text("/proc/stat"),
        &text("/proc/self/limits"),
    );
    s.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as i64);
    Some(s)
}

/// Registered on the root registry (no `dbpolicy_` prefix): `process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, … as client_golang names them.
#[derive(Debug, Default)]
pub(crate) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match read() {
            Some(s) => encode(&s, encoder),
            None => Ok(()),
        }
    }
}

fn gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Option<N>,
) -> Result<(), std::fmt::Error>
where
    ConstGauge<N>: EncodeMetric,
{
    if let Some(v) = value {
        let g = ConstGauge::new(v);
        g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
    }
    Ok(())
}

pub(crate) fn encode(
    s: &ProcessStats,
    mut encoder: DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let cpu = ConstCounter::new(s.cpu_seconds);
    cpu.encode(encoder.encode_descriptor(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds",
        None,
        cpu.metric_type(),
    )?)?;
    gauge(
        &mut encoder,
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        s.resident_bytes,
    )?;
    gauge(
        &mut encoder,
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes",
        s.virtual_bytes,
    )?;
    gauge(
        &mut encoder,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds",
        s.start_time_seconds,
    )?;
    gauge(
        &mut encoder,
        "process_open_fds",
        "Number of open file descriptors",
        s.open_fds,
    )?;
    gauge(
        &mut encoder,
        "process_max_fds",
        "Maximum number of open file descriptors",
        s.max_fds,
    )?;
    gauge(
        &mut encoder,
        "process_threads",
        "Number of OS threads in the process",
        s.threads,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files_with_a_command_name_holding_spaces_and_parens() {
        // Fields 3.. of a real /proc/self/stat, after a hostile comm.
        let stat = "4242 (db policy) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0 123400 104857600 2500 18446744073709551615";
        let status = "Name:\tdbpolicy\nVmSize:\t  102400 kB\nVmRSS:\t   10240 kB\nThreads:\t9\n";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1048576              1048576              files\n";
        let s = parse(stat, status, proc_stat, limits);
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.start_time_seconds, Some(1_700_001_234.0));
        assert_eq!(s.resident_bytes, Some(10240 * 1024));
        assert_eq!(s.virtual_bytes, Some(102400 * 1024));
        assert_eq!(s.threads, Some(9));
        assert_eq!(s.max_fds, Some(1_048_576));
        assert_eq!(parse("garbage", "", "", ""), ProcessStats::default());
    }

    #[test]
    fn this_process_is_read_on_linux() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        let s = read().expect("/proc/self is readable");
        assert!(s.resident_bytes.unwrap() > 0);
        assert!(s.open_fds.unwrap() > 0);
        assert!(s.start_time_seconds.unwrap() > 1_600_000_000.0);
    }
}
