//! [`PostgresStore`]: the MDM store in PostgreSQL, for a fleet (several server replicas, one
//! database).
//!
//! It uses the synchronous `postgres` client, as the SQLite store is synchronous: the server
//! calls the [`Store`] trait from its handlers and each call blocks for one statement, which
//! the async `tokio-postgres` would not change without making the trait async for SQLite too.
//! The sync client runs a small runtime of its own, which must not be entered from a thread
//! that already drives the server's runtime, so each connection lives on a thread of its own
//! and a call hands its statement to the next free one and waits for the answer. A connection
//! that breaks is opened again on the next call.
//!
//! Servers sharing the database tell each other about queued commands and revocations with
//! `NOTIFY` on [`DEVICE_CHANNEL`] (payload: the device id, delivered when the change commits);
//! [`Store::watch_devices`] keeps one more connection that `LISTEN`s on it.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;

use postgres::error::SqlState;
use postgres::{Client, Config, NoTls};

use super::{token_hash, AuditEntry, Command, Device, DeviceWaker, Store, StoreError};

/// The `NOTIFY` channel of queued commands and revocations; the payload is the device id.
pub const DEVICE_CHANNEL: &str = "pocketvisor_device";

/// Schema steps, embedded: the same steps as `migrations/sqlite/`, in PostgreSQL's dialect.
/// `pocketvisor_schema` counts those applied. Append, never edit.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_init.sql"),
    include_str!("../../migrations/postgres/0002_device_key.sql"),
];

/// Serialises migrations between servers starting at once (`pg_advisory_xact_lock` key).
const MIGRATION_LOCK: i64 = 0x7076_6d64_6d00; // "pvmdm"

type Job = Box<dyn FnOnce(Result<&mut Client, StoreError>) + Send>;

/// The PostgreSQL store: `pool` connections, each on its own thread.
pub struct PostgresStore {
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    config: Config,
    /// Set when the store is dropped: the listeners end within a second.
    closing: Arc<AtomicBool>,
    listeners: Mutex<Vec<JoinHandle<()>>>,
}

impl PostgresStore {
    /// Connects `pool` (at least 1) connections to the database at `url` (a `postgres://` URL
    /// or a `key=value` string; `host=/dir` reaches a unix socket) and applies pending
    /// migrations. The connection is not encrypted: use a unix socket or a private network.
    pub fn connect(url: &str, pool: usize) -> Result<Self, StoreError> {
        let config = Config::from_str(url)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let mut store = Self {
            jobs: Some(jobs),
            workers: Vec::new(),
            config: config.clone(),
            closing: Arc::new(AtomicBool::new(false)),
            listeners: Mutex::new(Vec::new()),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        for i in 0..pool.max(1) {
            let config = config.clone();
            let queue = queue.clone();
            let ready = ready_tx.clone();
            let worker = std::thread::Builder::new()
                .name(format!("mdm-pg-{i}"))
                .spawn(move || worker(config, queue, ready))
                .map_err(|e| {
                    StoreError::Unavailable(format!("starting a connection thread: {e}"))
                })?;
            store.workers.push(worker);
        }
        drop(ready_tx);
        // Every connection must open before the store is used; the first failure is the answer.
        for _ in 0..store.workers.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(StoreError::Unavailable("a connection thread died".into())),
            }
        }
        store.run(migrate)?;
        Ok(store)
    }

    /// Runs `job` on the next free connection and waits for its answer.
    fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Client) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (answer_tx, answer_rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |client| {
            let _ = answer_tx.send(client.and_then(job));
        });
        self.jobs
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("closed".into()))?
            .send(job)
            .map_err(|_| StoreError::Unavailable("no connection threads".into()))?;
        answer_rx
            .recv()
            .map_err(|_| StoreError::Unavailable("the connection thread died".into()))?
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Closing the queue ends every worker after its current statement.
        self.jobs = None;
        self.closing.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let listeners =
            std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|e| e.into_inner()));
        for l in listeners {
            let _ = l.join();
        }
    }
}

/// One connection's thread: takes jobs until the queue closes, reconnecting when needed.
fn worker(
    config: Config,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    ready: mpsc::Sender<Result<(), postgres::Error>>,
) {
    let mut client = match config.connect(NoTls) {
        Ok(c) => {
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    drop(ready);
    loop {
        let job = {
            let queue = queue.lock().unwrap_or_else(|e| e.into_inner());
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        if client.is_closed() {
            match config.connect(NoTls) {
                Ok(c) => client = c,
                Err(e) => {
                    job(Err(e.into()));
                    continue;
                }
            }
        }
        job(Ok(&mut client));
    }
}

/// A listener's thread: `LISTEN` on [`DEVICE_CHANNEL`] and call `wake` with each payload
/// until `closing`; a lost connection is opened again (backing off up to 5 s). A change
/// announced while the connection is down is missed: its poll returns at its deadline.
fn listen(config: Config, closing: Arc<AtomicBool>, wake: DeviceWaker) {
    let mut backoff = Duration::from_millis(100);
    while !closing.load(Ordering::Relaxed) {
        let listening = config.connect(NoTls).and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {DEVICE_CHANNEL}"))?;
            Ok(c)
        });
        let Ok(mut client) = listening else {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        };
        backoff = Duration::from_millis(100);
        'connected: while !closing.load(Ordering::Relaxed) && !client.is_closed() {
            let mut notifications = client.notifications();
            let mut batch = notifications.timeout_iter(Duration::from_secs(1));
            loop {
                match batch.next() {
                    Ok(Some(n)) => wake(n.payload()),
                    Ok(None) => break,
                    Err(_) => break 'connected,
                }
            }
        }
    }
}

/// Announces a change to `device_id`'s commands to every listening server, at commit.
fn announce(tx: &mut postgres::Transaction<'_>, device_id: &str) -> Result<(), StoreError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&DEVICE_CHANNEL, &device_id])?;
    Ok(())
}

/// Applies the migrations not yet applied, all in one transaction under an advisory lock, so
/// servers starting together apply each step once and a failed step leaves the schema as it was.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS pocketvisor_schema (applied BIGINT NOT NULL)")?;
    let applied: i64 = match tx.query_opt("SELECT applied FROM pocketvisor_schema", &[])? {
        Some(row) => row.try_get(0)?,
        None => {
            tx.execute("INSERT INTO pocketvisor_schema (applied) VALUES (0)", &[])?;
            0
        }
    };
    let applied_steps = usize::try_from(applied).unwrap_or(usize::MAX);
    if applied_steps > MIGRATIONS.len() {
        return Err(StoreError::SchemaTooNew {
            found: applied,
            known: MIGRATIONS.len(),
        });
    }
    for step in &MIGRATIONS[applied_steps..] {
        tx.batch_execute(step)?;
    }
    let now_applied = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    tx.execute(
        "UPDATE pocketvisor_schema SET applied = $1",
        &[&now_applied],
    )?;
    tx.commit()?;
    Ok(())
}

/// Maps a constraint failure to the store's meaning of it.
fn constraint(e: postgres::Error, device_id: &str) -> StoreError {
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => StoreError::Duplicate,
        Some(c) if *c == SqlState::FOREIGN_KEY_VIOLATION => {
            StoreError::UnknownDevice(device_id.to_owned())
        }
        _ => e.into(),
    }
}

// Columns are read with `try_get`: a schema changed behind the server's back is an error,
// not a panic.
fn device_row(r: &postgres::Row) -> Result<Device, postgres::Error> {
    Ok(Device {
        id: r.try_get(0)?,
        cert_sha256: r.try_get(1)?,
        enrolled_at: r.try_get(2)?,
        revoked: r.try_get(3)?,
        public_key: r.try_get(4)?,
    })
}

const DEVICE_COLUMNS: &str = "id, cert_sha256, enrolled_at, revoked, public_key";

impl Store for PostgresStore {
    fn add_token(&self, token: &str, expires_at: i64) -> Result<(), StoreError> {
        let hash = token_hash(token);
        self.run(move |c| {
            c.execute(
                "INSERT INTO enroll_tokens (token_sha256, expires_at) VALUES ($1, $2)",
                &[&hash, &expires_at],
            )
            .map_err(|e| constraint(e, ""))?;
            Ok(())
        })
    }

    fn redeem_token(&self, token: &str, now: i64) -> Result<(), StoreError> {
        let hash = token_hash(token);
        self.run(move |c| {
            // One statement: a racing redemption waits on the row lock, then sees `used_at`
            // set and matches nothing (READ COMMITTED re-checks the WHERE on the new row).
            let changed = c.execute(
                "UPDATE enroll_tokens SET used_at = $2
                 WHERE token_sha256 = $1 AND used_at IS NULL AND expires_at > $2",
                &[&hash, &now],
            )?;
            if changed == 1 {
                Ok(())
            } else {
                Err(StoreError::TokenRefused)
            }
        })
    }

    fn add_device(&self, d: &Device) -> Result<(), StoreError> {
        let d = d.clone();
        self.run(move |c| {
            c.execute(
                "INSERT INTO devices (id, cert_sha256, enrolled_at, revoked, public_key)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &d.id,
                    &d.cert_sha256,
                    &d.enrolled_at,
                    &d.revoked,
                    &d.public_key,
                ],
            )
            .map_err(|e| constraint(e, &d.id))?;
            Ok(())
        })
    }

    fn device_by_cert(&self, cert_sha256: &str) -> Result<Option<Device>, StoreError> {
        let fp = cert_sha256.to_owned();
        self.run(move |c| {
            let row = c.query_opt(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE cert_sha256 = $1"),
                &[&fp],
            )?;
            Ok(row.as_ref().map(device_row).transpose()?)
        })
    }

    fn devices(&self) -> Result<Vec<Device>, StoreError> {
        self.run(|c| {
            let rows = c.query(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY enrolled_at, id"),
                &[],
            )?;
            Ok(rows.iter().map(device_row).collect::<Result<_, _>>()?)
        })
    }

    fn revoke(&self, device_id: &str) -> Result<(), StoreError> {
        let id = device_id.to_owned();
        self.run(move |c| {
            let mut tx = c.transaction()?;
            let changed = tx.execute("UPDATE devices SET revoked = TRUE WHERE id = $1", &[&id])?;
            if changed != 1 {
                return Err(StoreError::UnknownDevice(id));
            }
            announce(&mut tx, &id)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn enqueue(
        &self,
        device_id: &str,
        kind: &str,
        body: &str,
        now: i64,
    ) -> Result<i64, StoreError> {
        let (id, kind, body) = (device_id.to_owned(), kind.to_owned(), body.to_owned());
        self.run(move |c| {
            let mut tx = c.transaction()?;
            // The foreign key refuses an unknown device in the same statement.
            let row = tx
                .query_one(
                    "INSERT INTO commands (device_id, kind, body, queued_at)
                     VALUES ($1, $2, $3, $4) RETURNING id",
                    &[&id, &kind, &body, &now],
                )
                .map_err(|e| constraint(e, &id))?;
            let command_id = row.try_get(0)?;
            announce(&mut tx, &id)?;
            tx.commit()?;
            Ok(command_id)
        })
    }

    fn pending(&self, device_id: &str) -> Result<Vec<Command>, StoreError> {
        let id = device_id.to_owned();
        self.run(move |c| {
            let rows = c.query(
                "SELECT id, kind, body, queued_at FROM commands
                 WHERE device_id = $1 AND done_at IS NULL ORDER BY id",
                &[&id],
            )?;
            let commands = rows.iter().map(|r| {
                Ok::<_, postgres::Error>(Command {
                    id: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    body: r.try_get(2)?,
                    queued_at: r.try_get(3)?,
                })
            });
            Ok(commands.collect::<Result<_, _>>()?)
        })
    }

    fn complete(
        &self,
        device_id: &str,
        command_id: i64,
        result: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let (id, result) = (device_id.to_owned(), result.to_owned());
        self.run(move |c| {
            // The device id is part of the match: a device cannot complete another's command.
            let changed = c.execute(
                "UPDATE commands SET result = $3, done_at = $4
                 WHERE id = $1 AND device_id = $2 AND done_at IS NULL",
                &[&command_id, &id, &result, &now],
            )?;
            if changed == 1 {
                Ok(())
            } else {
                Err(StoreError::UnknownCommand(command_id))
            }
        })
    }

    fn record_policy(
        &self,
        device_id: &str,
        version: u64,
        document: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let (id, document) = (device_id.to_owned(), document.to_owned());
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        self.run(move |c| {
            c.execute(
                "INSERT INTO policies (device_id, version, document, pushed_at)
                 VALUES ($1, $2, $3, $4)",
                &[&id, &version, &document, &now],
            )
            .map_err(|e| constraint(e, &id))?;
            Ok(())
        })
    }

    fn audit(&self, actor: &str, action: &str, detail: &str, now: i64) -> Result<(), StoreError> {
        let (actor, action, detail) = (actor.to_owned(), action.to_owned(), detail.to_owned());
        self.run(move |c| {
            c.execute(
                "INSERT INTO audit (time, actor, action, detail) VALUES ($1, $2, $3, $4)",
                &[&now, &actor, &action, &detail],
            )?;
            Ok(())
        })
    }

    fn audit_log(&self) -> Result<Vec<AuditEntry>, StoreError> {
        self.run(|c| {
            let rows = c.query(
                "SELECT time, actor, action, detail FROM audit ORDER BY id",
                &[],
            )?;
            let entries = rows.iter().map(|r| {
                Ok::<_, postgres::Error>(AuditEntry {
                    time: r.try_get(0)?,
                    actor: r.try_get(1)?,
                    action: r.try_get(2)?,
                    detail: r.try_get(3)?,
                })
            });
            Ok(entries.collect::<Result<_, _>>()?)
        })
    }

    fn add_compliance(&self, device_id: &str, report: &str, now: i64) -> Result<(), StoreError> {
        let (id, report) = (device_id.to_owned(), report.to_owned());
        self.run(move |c| {
            c.execute(
                "INSERT INTO compliance (device_id, received_at, report) VALUES ($1, $2, $3)",
                &[&id, &now, &report],
            )
            .map_err(|e| constraint(e, &id))?;
            Ok(())
        })
    }

    fn watch_devices(&self, wake: DeviceWaker) -> Result<(), StoreError> {
        let (config, closing) = (self.config.clone(), self.closing.clone());
        let listener = std::thread::Builder::new()
            .name("mdm-pg-listen".into())
            .spawn(move || listen(config, closing, wake))
            .map_err(|e| StoreError::Unavailable(format!("starting the listener: {e}")))?;
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(listener);
        Ok(())
    }

    fn latest_compliance(&self, device_id: &str) -> Result<Option<String>, StoreError> {
        let id = device_id.to_owned();
        self.run(move |c| {
            let row = c.query_opt(
                "SELECT report FROM compliance WHERE device_id = $1 ORDER BY id DESC LIMIT 1",
                &[&id],
            )?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }
}
