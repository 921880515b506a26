"""Alembic migration scripts; they ship inside the package so `comzy-server db upgrade` finds them."""
