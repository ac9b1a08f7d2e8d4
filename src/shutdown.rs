//! The stop signal every long-running task watches. A leaf: it uses nothing of pgnear's.

use tokio::sync::watch;

/// Held by whoever may stop pgnear (the `Proxy`); dropping it also stops everything.
pub struct Stop(watch::Sender<bool>);

/// A task's view of the stop signal; cheap to clone.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new stop signal, not yet raised.
pub fn channel() -> (Stop, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Stop(tx), Shutdown(rx))
}

impl Stop {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Resolves once a stop has been asked for (or its `Stop` is gone). Cancel-safe.
    pub async fn stopped(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn is_stopped(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stops_on_request_and_when_the_stop_is_dropped() {
        let (stop, mut shutdown) = channel();
        assert!(!shutdown.is_stopped());
        stop.stop();
        assert!(shutdown.is_stopped());
        shutdown.stopped().await;

        let (stop, mut shutdown) = channel();
        drop(stop);
        assert!(shutdown.is_stopped());
        shutdown.stopped().await;
    }
}
