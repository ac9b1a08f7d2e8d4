//! Pipelined replica reads (`pool.pipeline`, transaction mode): the autocommit reads of many
//! sessions share a few server connections per role and database, several in flight on each.
//!
//! A relay costs each query two more socket writes and two more wakeups than talking to
//! Postgres directly. Here the reads that arrive together go out in one write, and the server
//! reads them in one go and runs them back to back without sleeping in between.
//!
//! The price: a read queued behind a slow one (a long query, a client slow to take its rows)
//! waits for it. A connection whose current read has run longer than `STUCK` takes no more;
//! when no shared connection can take a read, it runs on a pooled connection of its own, as
//! without pipelining.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::expect::Purpose;
use super::rename::{close_frame, STATEMENTS_PER_CONNECTION};
use super::server::{Again, Request, Retry, Seen, Server};
use super::state::{sync_sql, Applied};
use crate::backend::health::SILENT_CHECK;
use crate::backend::pool::{Pool, Pooled, Target};
use crate::cancel::CancelSlot;
use crate::config::PoolConfig;
use crate::consistency::watcher::{poll_deadline, Watcher};
use crate::error::PgError;
use crate::protocol::{frames, tag};
use crate::role::Role;
use crate::shutdown::Shutdown;

/// A shared connection whose current read has run this long takes no more reads.
const STUCK: Duration = Duration::from_millis(2);
/// Most request bytes queued on a shared connection behind the one running (so pgnear's writes
/// never wait on a server that is itself waiting for pgnear to read).
const MAX_QUEUED_BYTES: usize = 32 * 1024;

/// One session's read, sent as is after whatever brings the connection to the session's
/// settings and statements.
pub struct Job {
    /// A simple Query, or extended-protocol messages ending in their only Sync.
    pub frames: Bytes,
    /// A simple Query: a 25006 refusal comes back as `Reply::Done` with the Query to retry.
    pub query: bool,
    /// The session's settings (`SessionState::applied_shared`).
    pub applied: Applied,
    /// Shared statements the messages use, with their Parse: prepared first where missing.
    pub statements: Vec<(String, Bytes)>,
    /// The client's cancel slot: it points at the connection while this read runs.
    pub cancel: CancelSlot,
    pub reply: mpsc::Sender<Reply>,
}

/// A session's end of its answers channel.
pub type Answers = (mpsc::Sender<Reply>, mpsc::Receiver<Reply>);

pub enum Reply {
    /// Frames for the client.
    Bytes(BytesMut),
    /// The read finished; with the Query when the replica refused it as a write.
    Done(Request, Option<Retry>),
    /// The connection failed with the read in flight (it may or may not have run).
    Failed(PgError),
    /// Nothing was sent: the session runs it the usual way.
    Unsent,
}

/// The shared connections of one upstream (the replica), per role and database (`Target::key`).
pub struct Lanes {
    pool: Arc<Pool>,
    config: PoolConfig,
    connect_timeout: Duration,
    watcher: Option<Arc<Watcher>>,
    shutdown: Shutdown,
    spinner: Arc<crate::spin::Spinner>,
    lanes: Mutex<HashMap<String, Vec<Arc<Lane>>>>,
    /// Connections being opened, per target key.
    opening: Mutex<HashMap<String, usize>>,
    epoch: Instant,
}

/// One shared connection, as submitters see it.
struct Lane {
    tx: mpsc::UnboundedSender<Job>,
    /// Reads sent and not finished.
    depth: AtomicUsize,
    /// Request bytes of those reads.
    queued: AtomicUsize,
    /// When the oldest of them started running (µs since `Lanes::epoch`).
    head_since: AtomicU64,
    closed: AtomicBool,
}

/// A read in flight on a shared connection.
struct Waiting {
    reply: mpsc::Sender<Reply>,
    cancel: CancelSlot,
    bytes: usize,
}

impl Lanes {
    pub fn new(
        pool: Arc<Pool>,
        config: PoolConfig,
        connect_timeout: Duration,
        watcher: Option<Arc<Watcher>>,
        shutdown: Shutdown,
        spinner: Arc<crate::spin::Spinner>,
    ) -> Lanes {
        Lanes {
            pool,
            config,
            connect_timeout,
            watcher,
            shutdown,
            spinner,
            lanes: Mutex::default(),
            opening: Mutex::default(),
            epoch: Instant::now(),
        }
    }

    fn micros(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Queues `job` on the least busy shared connection of `target` that can take it; gives
    /// it back when there is none (one is opened in the background while below
    /// `pool.pipeline`).
    pub fn submit(self: &Arc<Self>, target: &Target, job: Job) -> Result<(), Job> {
        let key = target.key();
        let size = job.frames.len();
        let now = self.micros();
        let stuck = STUCK.as_micros() as u64;
        let mut all = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let list = match all.get_mut(key) {
            Some(list) => list,
            None => all.entry(key.to_string()).or_default(),
        };
        list.retain(|l| !l.closed.load(Ordering::Relaxed));
        let takes = |l: &&Arc<Lane>| {
            l.depth.load(Ordering::Relaxed) == 0
                || (now.saturating_sub(l.head_since.load(Ordering::Relaxed)) < stuck
                    && l.queued.load(Ordering::Relaxed) + size <= MAX_QUEUED_BYTES)
        };
        let best = list
            .iter()
            .filter(takes)
            .min_by_key(|l| l.depth.load(Ordering::Relaxed))
            .cloned();
        let all_busy = best
            .as_ref()
            .is_none_or(|l| l.depth.load(Ordering::Relaxed) > 0);
        let open = list.len();
        drop(all);
        if all_busy && open < self.config.pipeline {
            self.open_more(target, open);
        }
        let Some(lane) = best else {
            return Err(job);
        };
        if lane.depth.fetch_add(1, Ordering::Relaxed) == 0 {
            // It runs next: its clock starts now, not when the lane's task gets to it.
            lane.head_since.store(now, Ordering::Relaxed);
        }
        lane.queued.fetch_add(size, Ordering::Relaxed);
        lane.tx.send(job).map_err(|e| {
            lane.depth.fetch_sub(1, Ordering::Relaxed);
            lane.queued.fetch_sub(size, Ordering::Relaxed);
            e.0
        })
    }

    /// Opens another shared connection for `target` unless `pool.pipeline` are open or
    /// opening.
    fn open_more(self: &Arc<Self>, target: &Target, open: usize) {
        let mut opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        let n = opening.entry(target.key().to_string()).or_default();
        if open + *n >= self.config.pipeline || self.shutdown.is_stopped() {
            return;
        }
        *n += 1;
        drop(opening);
        let (lanes, target) = (self.clone(), target.clone());
        tokio::spawn(async move {
            match lanes.pool.acquire(&target).await {
                Ok(conn) => lanes.run(target.key().to_string(), conn).await,
                Err(e) => {
                    tracing::debug!(error = %e, "no connection for pipelined reads");
                    lanes.opened(target.key());
                }
            }
        });
    }

    /// A connection `open_more` started opening is open (and listed) or failed.
    fn opened(&self, key: &str) {
        let mut opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = opening.get_mut(key) {
            *n -= 1;
        }
    }

    /// Serves one shared connection until it fails, idles out or ages, or pgnear stops.
    async fn run(self: Arc<Self>, key: String, conn: Pooled) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let lane = Arc::new(Lane {
            tx,
            depth: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            head_since: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        self.lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(lane.clone());
        self.opened(&key);
        let opened = Instant::now();
        let mut server = Server::new(conn, Role::Replica);
        server.reader.one_request = true;
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        let mut cout = BytesMut::new();
        let mut idle_since = Instant::now();
        let mut tick = tokio::time::interval(SILENT_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.clone();
        let result = loop {
            self.spinner.poke();
            tokio::select! {
                biased;
                job = rx.recv() => {
                    let Some(job) = job else { break Ok(()) };
                    self.enqueue(&lane, &mut server, job, &mut waiting);
                    // The sessions ready to run now queue their reads first: all go out in one
                    // write.
                    tokio::task::yield_now().await;
                    while let Ok(job) = rx.try_recv() {
                        self.enqueue(&lane, &mut server, job, &mut waiting);
                    }
                    if let Err(e) = server.flush().await {
                        break Err(e);
                    }
                }
                r = server.read() => {
                    let relayed = match r {
                        Ok(()) => self.relay(&lane, &mut server, &mut waiting, &mut cout).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = relayed {
                        break Err(e);
                    }
                    if waiting.is_empty() {
                        idle_since = Instant::now();
                    }
                }
                _ = tick.tick() => {
                    if !waiting.is_empty() {
                        let up = self.watcher.as_ref().is_some_and(|w| w.current().up);
                        if let Some(e) = server.stopped_answering(poll_deadline(self.connect_timeout), up) {
                            break Err(e);
                        }
                    } else if idle_since.elapsed() >= self.config.idle_timeout.0
                        || opened.elapsed() >= self.config.max_lifetime.0
                    {
                        break Ok(());
                    }
                }
                _ = shutdown.stopped(), if waiting.is_empty() => break Ok(()),
            }
        };
        lane.closed.store(true, Ordering::Relaxed);
        rx.close();
        while let Ok(job) = rx.try_recv() {
            let _ = job.reply.try_send(Reply::Unsent);
        }
        match result {
            Ok(()) if waiting.is_empty() && server.is_reusable() => {
                self.pool.release(server.conn, true);
            }
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "lost a connection shared by pipelined reads");
                let e = PgError { fatal: false, ..e }
                    .with_detail("The statement may not have completed.");
                for w in waiting {
                    clear_cancel(&w.cancel);
                    let _ = w.reply.send(Reply::Failed(e.clone())).await;
                }
            }
        }
    }

    /// Queues a job's frames, after pgnear's own to bring the connection to its settings and
    /// statements.
    fn enqueue(&self, lane: &Lane, server: &mut Server, job: Job, waiting: &mut VecDeque<Waiting>) {
        if server.conn.carry.applied[..] != job.applied[..] {
            if let Some(sql) = sync_sql(&server.conn.carry.applied, &job.applied) {
                server.send_internal_query(&sql, Purpose::Sync);
            }
            server.conn.carry.applied = job.applied.to_vec();
        }
        for (name, parse) in &job.statements {
            if !server.has_statement(name) {
                server.send_internal_frame(tag::PARSE, parse);
                if let Some(old) = server.add_statement(name, STATEMENTS_PER_CONNECTION) {
                    server.send_internal_frame(tag::CLOSE, &close_frame(&old));
                }
            }
        }
        if job.query {
            let request = Request {
                again: Some(Again::Query(job.frames.clone())),
                ..Request::default()
            };
            server.send_query(&job.frames, request);
        } else {
            for (t, frame) in frames(&job.frames) {
                server.send_client_frame(t, frame);
            }
            server.requests.push_back(Request {
                started: Some(Instant::now()),
                ..Request::default()
            });
        }
        if waiting.is_empty() {
            lane.head_since.store(self.micros(), Ordering::Relaxed);
            point_cancel(&job.cancel, server);
        }
        waiting.push_back(Waiting {
            reply: job.reply,
            cancel: job.cancel,
            bytes: job.frames.len(),
        });
    }

    /// Passes what the server sent to the reads it answers, oldest first.
    async fn relay(
        &self,
        lane: &Lane,
        server: &mut Server,
        waiting: &mut VecDeque<Waiting>,
        cout: &mut BytesMut,
    ) -> Result<(), PgError> {
        loop {
            let mut seen = Seen::default();
            server.scan(cout, &mut seen, None)?;
            let finished = match (seen.done.pop(), seen.retry) {
                (Some(request), _) => Some((request, None)),
                (None, Some(retry)) => Some((Request::default(), Some(retry))),
                (None, None) => None,
            };
            let Some(head) = waiting.front() else {
                // Nothing asked for it (a notice between reads): dropped.
                cout.clear();
                return Ok(());
            };
            if !cout.is_empty() {
                // A session that left takes nothing more; the read still runs to its end.
                let _ = head.reply.send(Reply::Bytes(cout.split())).await;
            }
            let Some((request, retry)) = finished else {
                return Ok(());
            };
            let head = waiting.pop_front().expect("checked above");
            clear_cancel(&head.cancel);
            let _ = head.reply.send(Reply::Done(request, retry)).await;
            lane.depth.fetch_sub(1, Ordering::Relaxed);
            lane.queued.fetch_sub(head.bytes, Ordering::Relaxed);
            if server.tx != b'I' {
                return Err(PgError::upstream(
                    "a pipelined read left a transaction open; connection closed",
                ));
            }
            if let Some(next) = waiting.front() {
                lane.head_since.store(self.micros(), Ordering::Relaxed);
                point_cancel(&next.cancel, server);
            }
        }
    }
}

fn point_cancel(slot: &CancelSlot, server: &Server) {
    if let Ok(mut slot) = slot.lock() {
        *slot = Some(server.cancel_target());
    }
}

fn clear_cancel(slot: &CancelSlot) {
    if let Ok(mut slot) = slot.lock() {
        *slot = None;
    }
}
