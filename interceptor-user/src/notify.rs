//! systemd service notifications (`sd_notify(3)`): `READY=1` once the agent
//! serves (the moment `interceptor status` succeeds), `STOPPING=1` when it
//! starts shutting down, and `WATCHDOG=1` only while every runtime of the
//! data path still runs its tasks.
//!
//! Each runtime feeds a [`Heartbeat`]: a task that bumps a counter on a
//! timer. A runtime wedged by a blocking call or a busy loop stops bumping,
//! the watchdog thread withholds its ping, and systemd restarts the agent
//! after `WatchdogSec=`. A ping from a timer thread of its own would prove
//! only that the process exists.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd as `Type=notify`) every
//! call here does nothing; without `WATCHDOG_USEC` no heartbeat runs.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use sd_notify::NotifyState;

/// Tells systemd the agent is ready, with a one-line status for
/// `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the agent is stopping (it then stops the watchdog too).
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// One runtime's liveness counter; run [`Heartbeat::run`] as a task on it.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    count: Arc<AtomicU64>,
    every: Duration,
}

impl Heartbeat {
    /// Bumps the counter every tick, forever (abort the task or drop the
    /// runtime to end it).
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The watchdog as systemd configured it (`WATCHDOG_USEC`), with the
/// heartbeats of the runtimes it watches.
pub struct Watchdog {
    timeout: Duration,
    beats: Vec<(String, Arc<AtomicU64>)>,
}

impl Watchdog {
    /// The watchdog systemd asked for, if any (`WATCHDOG_USEC`, for this
    /// process per `WATCHDOG_PID`, with a `NOTIFY_SOCKET` to ping).
    #[must_use]
    pub fn from_env() -> Option<Self> {
        std::env::var_os("NOTIFY_SOCKET")?;
        Self::with_timeout(sd_notify::watchdog_enabled()?)
    }

    /// A watchdog for `timeout`; `None` for a zero timeout (disabled).
    #[must_use]
    pub fn with_timeout(timeout: Duration) -> Option<Self> {
        (!timeout.is_zero()).then(|| Self {
            timeout,
            beats: Vec::new(),
        })
    }

    /// A new heartbeat named `name` (for the log when it stalls). It ticks
    /// eight times per timeout, four times between two checks, so one late
    /// tick under load never withholds a ping.
    pub fn heartbeat(&mut self, name: &str) -> Heartbeat {
        let count = Arc::new(AtomicU64::new(0));
        self.beats.push((name.to_owned(), Arc::clone(&count)));
        Heartbeat {
            count,
            every: (self.timeout / 8).max(Duration::from_millis(1)),
        }
    }

    /// Starts the thread that pings systemd every half timeout while every
    /// heartbeat advanced since the previous check.
    ///
    /// # Errors
    /// When the thread cannot start.
    pub fn start(self) -> std::io::Result<WatchdogThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || self.run(&flag))?;
        Ok(WatchdogThread { stop, handle })
    }

    fn run(self, stop: &AtomicBool) {
        let mut last = vec![0; self.beats.len()];
        let mut stalled = false;
        while !stop.load(Ordering::Relaxed) {
            std::thread::park_timeout(self.timeout / 2);
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let now: Vec<u64> = self
                .beats
                .iter()
                .map(|(_, c)| c.load(Ordering::Relaxed))
                .collect();
            match stalled_beat(&mut last, &now) {
                None => {
                    if stalled {
                        tracing::info!("every runtime runs again; watchdog pings resumed");
                        stalled = false;
                    }
                    send(&[NotifyState::Watchdog]);
                }
                Some(i) => {
                    if !stalled {
                        let name = self.beats.get(i).map_or("?", |(n, _)| n.as_str());
                        tracing::error!(
                            runtime = name,
                            "runtime stalled for {:?}: watchdog ping withheld",
                            self.timeout / 2
                        );
                        stalled = true;
                    }
                }
            }
        }
    }
}

/// The first heartbeat that did not advance since `last`, if any; `last`
/// takes the values of those that did.
fn stalled_beat(last: &mut [u64], now: &[u64]) -> Option<usize> {
    let mut stalled = None;
    for (i, (l, n)) in last.iter_mut().zip(now).enumerate() {
        if *n == *l {
            stalled = stalled.or(Some(i));
        } else {
            *l = *n;
        }
    }
    stalled
}

/// The running watchdog thread; [`WatchdogThread::stop`] ends it.
pub struct WatchdogThread {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl WatchdogThread {
    /// Stops pinging and waits for the thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
        let _ = self.handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_needs_every_heartbeat_to_advance() {
        let mut last = vec![0, 0];
        assert_eq!(stalled_beat(&mut last, &[1, 1]), None);
        assert_eq!(stalled_beat(&mut last, &[2, 1]), Some(1));
        // The one that advanced is remembered, the stalled one is not.
        assert_eq!(last, vec![2, 1]);
        assert_eq!(stalled_beat(&mut last, &[2, 2]), Some(0));
        assert_eq!(stalled_beat(&mut last, &[3, 3]), None);
        assert_eq!(stalled_beat(&mut [], &[]), None);
    }

    #[test]
    fn zero_timeout_is_no_watchdog() {
        assert!(Watchdog::with_timeout(Duration::ZERO).is_none());
    }

    #[test]
    fn heartbeat_ticks_eight_times_per_timeout() {
        let mut w = Watchdog::with_timeout(Duration::from_secs(8)).unwrap_or_else(|| panic!());
        assert_eq!(w.heartbeat("worker-0").every, Duration::from_secs(1));
        assert_eq!(w.beats.len(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn heartbeat_counts_ticks() {
        let mut w = Watchdog::with_timeout(Duration::from_millis(80)).unwrap_or_else(|| panic!());
        let beat = w.heartbeat("worker-0");
        let task = tokio::spawn(beat.run());
        tokio::time::sleep(Duration::from_millis(50)).await;
        task.abort();
        // The first tick is immediate, the next ones every 10 ms.
        assert!(w.beats[0].1.load(Ordering::Relaxed) >= 2);
    }
}
