//! One test body, two stores: [`Backend`] opens the SQLite or the PostgreSQL store, and
//! [`on_both_stores!`] turns a test fn taking a `Backend` into `NAME::sqlite` and
//! `NAME::postgres` tests. PostgreSQL runs on a scratch cluster shared by the test binary, one
//! database per test ([`mdm::store::pg_scratch::database_for_test`], which also decides what a
//! missing PostgreSQL means: a loud skip, or a failure under `CI`).

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use mdm::{PostgresStore, SqliteStore, Store};

/// Where a test's store lives; [`Backend::open`] may be called again to reopen it.
pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

/// Connections a PostgreSQL store opened by a test keeps (more than one, so that concurrent
/// requests really run concurrently in the database).
const PG_CONNECTIONS: usize = 4;

impl Backend {
    pub fn sqlite() -> Backend {
        Backend::Sqlite(tempfile::tempdir().unwrap())
    }

    /// A fresh database for `test`, or `None` (skip) when PostgreSQL is not installed here.
    pub fn postgres(test: &str) -> Option<Backend> {
        mdm::store::pg_scratch::database_for_test(test).map(Backend::Postgres)
    }

    /// A second, empty store of the same kind (a second server in one test).
    pub fn another(&self) -> Backend {
        match self {
            Backend::Sqlite(_) => Backend::sqlite(),
            Backend::Postgres(_) => Backend::postgres("another").expect("the cluster is running"),
        }
    }

    /// Opens the store (again: the same data).
    pub fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(dir) => {
                Arc::new(SqliteStore::open(&dir.path().join("mdm.db")).unwrap())
            }
            Backend::Postgres(url) => {
                Arc::new(PostgresStore::connect(url, PG_CONNECTIONS).unwrap())
            }
        }
    }

    /// `mdm serve` arguments that select this store (state stays in `--state-dir` either way).
    pub fn serve_args(&self) -> Vec<String> {
        match self {
            Backend::Sqlite(_) => vec![],
            Backend::Postgres(url) => vec!["--store".into(), url.clone()],
        }
    }

    /// Every byte the store has written to disk: the SQLite file and its WAL, or every file
    /// of the PostgreSQL cluster (tables and write-ahead log).
    pub fn bytes_on_disk(&self) -> Vec<u8> {
        let root = match self {
            Backend::Sqlite(dir) => dir.path().to_path_buf(),
            Backend::Postgres(url) => {
                let host = url.split("host=").nth(1).expect("a unix socket URL");
                Path::new(host).join("data")
            }
        };
        let mut out = Vec::new();
        read_all(&root, &mut out);
        out
    }
}

fn read_all(dir: &Path, out: &mut Vec<u8>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            read_all(&path, out);
        } else if kind.is_file() {
            // A file the server removes while we walk is simply not there.
            if let Ok(bytes) = std::fs::read(&path) {
                out.extend(bytes);
            }
        }
    }
}

/// `on_both_stores!(sync NAME)` for `fn NAME(b: Backend)`, `on_both_stores!(async NAME)` for
/// `async fn NAME(b: Backend)` (attributes after the name go on each `#[tokio::test]`, such as
/// `flavor = "multi_thread"`): makes the tests `NAME::sqlite` and `NAME::postgres`.
#[macro_export]
macro_rules! on_both_stores {
    (sync $name:ident) => {
        mod $name {
            #[test]
            fn sqlite() {
                super::$name($crate::support::Backend::sqlite())
            }
            #[test]
            fn postgres() {
                let Some(b) = $crate::support::Backend::postgres(stringify!($name)) else {
                    return;
                };
                super::$name(b)
            }
        }
    };
    (async $name:ident $(, $($arg:tt)*)?) => {
        mod $name {
            #[tokio::test$(($($arg)*))?]
            async fn sqlite() {
                super::$name($crate::support::Backend::sqlite()).await
            }
            #[tokio::test$(($($arg)*))?]
            async fn postgres() {
                let Some(b) = $crate::support::Backend::postgres(stringify!($name)) else {
                    return;
                };
                super::$name(b).await
            }
        }
    };
}
