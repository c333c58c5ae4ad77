"""The database: the Store, the tables and engine, catalog files (import/export) and migrations."""
