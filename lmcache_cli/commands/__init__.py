"""One module per `lmcache` command; `lmcache_cli.main` composes them."""
