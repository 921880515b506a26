"""Built-in plugins, each enabled by naming it in COMZY_PLUGINS."""
