"""Alembic migrations of the registry schema (specs, sessions, messages, effects ledger)."""
