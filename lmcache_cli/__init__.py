"""The `lmcache` command: a thin Typer layer over lmcache_core."""
