"""The example plugin's Alembic revisions (a package, so that they ship in the wheel).

Run with Comzy's shared environment by ``comzy-server db upgrade`` (or, on the embedded SQLite,
by the plugin's ``on_startup``); write new ones with
``python -m comzy.migrations revision --plugin example --autogenerate -m "..."``.
"""
