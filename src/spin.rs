//! Busy polling (`proxy.busy_poll`): after activity, the runtime keeps polling its sockets for
//! a while instead of sleeping, so the next message is picked up without a wakeup.
//!
//! A relayed query wakes pgnear twice (the client's message, the server's answer); on a VM each
//! wakeup of a sleeping thread costs microseconds. While the spinner task keeps yielding, the
//! runtime polls its sockets between turns (epoll with no timeout) and never sleeps; between
//! turns it also yields the CPU to any other runnable thread, so it takes only idle CPU time
//! from the machine's other processes, though the CPU never idles while clients are active.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::shutdown::Shutdown;

pub struct Spinner {
    epoch: Instant,
    /// The polling window in µs (0: off).
    window: u64,
    /// Last activity, in µs since `epoch`.
    last: AtomicU64,
    spinning: AtomicBool,
    wake: Notify,
}

impl Spinner {
    pub fn new(window: Duration) -> Spinner {
        Spinner {
            epoch: Instant::now(),
            window: window.as_micros() as u64,
            last: AtomicU64::new(0),
            spinning: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Something happened: poll for the window from now on.
    pub fn poke(&self) {
        if self.window == 0 {
            return;
        }
        self.last.store(self.now(), Ordering::Relaxed);
        if !self.spinning.load(Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// The spinner task: sleeps until poked, then yields until the window has passed without
    /// activity. Ends when pgnear stops.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = shutdown.stopped() => return,
            }
            self.spinning.store(true, Ordering::Relaxed);
            while self.now().saturating_sub(self.last.load(Ordering::Relaxed)) < self.window {
                tokio::task::yield_now().await;
                std::thread::yield_now();
            }
            // A poke between the check above and this store leaves a permit in `wake`.
            self.spinning.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spins_after_activity_and_stops_when_idle() {
        let spinner = Arc::new(Spinner::new(Duration::from_millis(2)));
        let (stop, rx) = crate::shutdown::channel();
        let task = tokio::spawn(spinner.clone().run(rx));
        let spinning = || spinner.spinning.load(Ordering::Relaxed);
        for _ in 0..2 {
            assert!(!spinning());
            spinner.poke();
            until("it spins", || {
                spinner.poke();
                spinning()
            })
            .await;
            until("it stops once idle", || !spinning()).await;
        }
        stop.stop();
        task.await.unwrap();
    }

    #[test]
    fn off_never_wakes_the_task() {
        let spinner = Spinner::new(Duration::ZERO);
        spinner.poke();
        assert_eq!(spinner.last.load(Ordering::Relaxed), 0);
    }
}
