//! The schema migrations of each backend, embedded in the binary in the order they apply.
//!
//! A migration is never edited once released: a schema change is a new file with the next
//! version. Each backend records applied versions in a `schema_migrations` table and
//! refuses a database whose newest version this build does not know (it was migrated by
//! a newer fleetpipe, and this one could misread it).

use crate::StoreError;

/// One versioned SQL script.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub version: u32,
    pub sql: &'static str,
}

/// SQLite migrations, oldest first.
pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/sqlite/0001_init.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/sqlite/0002_series_tags.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../migrations/sqlite/0003_retention.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../migrations/sqlite/0004_chunks.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../migrations/sqlite/0005_hourly_rollups.sql"),
    },
    Migration {
        version: 6,
        sql: include_str!("../migrations/sqlite/0006_snapshots_by_tick.sql"),
    },
];

/// PostgreSQL migrations, oldest first.
pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../migrations/postgres/0002_series_tags.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../migrations/postgres/0003_retention.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../migrations/postgres/0004_partitioned_readings.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../migrations/postgres/0005_hourly_rollups.sql"),
    },
];

/// The newest version in `list`.
pub(crate) fn latest(list: &[Migration]) -> u32 {
    list.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Fails when the database was migrated past what this build knows.
pub(crate) fn check_not_newer(found: Option<i64>, list: &[Migration]) -> Result<(), StoreError> {
    let known = latest(list);
    match found {
        Some(v) if v > i64::from(known) => Err(StoreError::Migration {
            version: u32::try_from(v).unwrap_or(u32::MAX),
            reason: format!(
                "the database schema is at version {v} but this build of fleetpipe only knows \
                 versions up to {known}; run a newer fleetpipe (or restore a backup taken before \
                 the upgrade)"
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_start_at_one_and_increase_by_one() {
        for list in [SQLITE, POSTGRES] {
            for (i, m) in list.iter().enumerate() {
                assert_eq!(m.version as usize, i + 1);
                assert!(!m.sql.trim().is_empty());
            }
        }
    }

    #[test]
    fn newer_database_is_refused() {
        assert!(check_not_newer(None, SQLITE).is_ok());
        assert!(check_not_newer(Some(1), SQLITE).is_ok());
        let err = check_not_newer(Some(99), SQLITE).unwrap_err();
        assert!(!err.is_transient());
        assert!(err.to_string().contains("version 99"), "{err}");
    }
}
