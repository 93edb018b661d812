"""`lmcache config`: the effective configuration and where each value came from."""

from __future__ import annotations

from typing import Any

import typer

from lmcache_cli.errors import CliError
from lmcache_cli.output import Column, safe_url
from lmcache_cli.state import FormatOption, get_state


def config(ctx: typer.Context, format_: FormatOption = None) -> None:
    """Show the effective configuration and where each value came from."""
    from lmcache_core.errors import ConfigError

    state = get_state(ctx)
    out = state.output(format_)
    url, url_source = state.store_url()
    path, path_source = state.config_file()
    try:
        cfg = state.config()
        from lmcache_core.store_ops import Store

        store_desc = Store(url, cfg).describe() if url else Store(None, cfg).describe()
    except ConfigError as exc:
        # The generic hint says "see `lmcache config`": here that is this very command.
        if url and getattr(exc, "field", None) == "store URL":
            fix = f"fix the store URL ({url_source})"
        else:
            import dataclasses

            from lmcache_core.config import LMCacheEngineConfig

            field = getattr(exc, "field", "")
            known = {f.name for f in dataclasses.fields(LMCacheEngineConfig)} - {"sources"}
            var = f"LMCACHE_{field.upper()}" if field in known else None
            fix = "fix " + " or ".join(x for x in (path and f"{path} ({path_source})", var) if x)
            if fix == "fix ":
                fix = "fix the config file or LMCACHE_<FIELD> variable it names"
        raise CliError(f"configuration: {exc}; {fix}") from None
    values = cfg.to_dict(mask_secrets=True)
    rows: list[dict[str, Any]] = [
        {"name": "store", "value": safe_url(url) if url else store_desc, "source": url_source},
        {"name": "config_file", "value": path, "source": path_source},
    ]
    ignored, why = state.ignored_env_tiers()  # tier variables that --store/LMCACHE_STORE overrides
    for name, value in values.items():
        source = cfg.sources.get(name, "default")
        if source.removeprefix("env ") in ignored:
            source += f" (ignored: {why})"
        rows.append({"name": name, "value": value, "source": source})
    if out.json:
        out.data({"store": rows[0]["value"], "settings": rows})
        return
    out.table(
        [Column("SETTING"), Column("VALUE"), Column("SOURCE")],
        [[r["name"], "-" if r["value"] is None else r["value"], r["source"]] for r in rows],
    )
