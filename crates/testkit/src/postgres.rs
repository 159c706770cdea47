// Written by the store work: a throwaway PostgreSQL cluster.
pub struct PgServer;
