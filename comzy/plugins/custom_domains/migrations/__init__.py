"""The plugin custom_domains's Alembic revisions, run with the core's shared environment (comzy/migrations/env.py).

See docs/plugin_hooks.md, "Tables and migrations".
"""
