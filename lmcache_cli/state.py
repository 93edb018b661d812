"""Global options: which store, which config, how to print. Resolved once per run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lmcache_cli.errors import usage_error
from lmcache_cli.output import Output, OutputFormat
from lmcache_core.config import CONFIG_FILE_ENV, LMCacheEngineConfig

if TYPE_CHECKING:
    from lmcache_core.store_ops import Store

STORE_ENV = "LMCACHE_STORE"

FormatOption = Annotated[
    OutputFormat | None,
    typer.Option("--format", metavar="human|json", help="Output: human (tables) or json (one document on stdout, for scripts)."),
]


def default_store_path() -> str:
    """The default disk store: ``$XDG_CACHE_HOME/lmcache`` (platformdirs' user cache dir)."""
    from platformdirs import user_cache_dir

    return user_cache_dir("lmcache", appauthor=False)


@dataclass
class CliState:
    """What the root options resolved to; commands read it from ``ctx.obj``."""

    store_option: str | None = None
    config_option: str | None = None
    fmt: OutputFormat = OutputFormat.human
    quiet: bool = False
    _config: LMCacheEngineConfig | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        from lmcache_core.config import mask_url  # torch-free

        store = mask_url(self.store_option) if self.store_option else None
        return (
            f"CliState(store_option={store!r}, config_option={self.config_option!r}, "
            f"fmt={self.fmt.value!r}, quiet={self.quiet!r})"
        )

    # -- where things come from ----------------------------------------------------

    def config_file(self) -> tuple[str | None, str]:
        """(path, source) of the LMCache YAML in effect, if any."""
        if self.config_option:
            return self.config_option, "--config"
        if not self.store_option and os.environ.get(CONFIG_FILE_ENV):
            return os.environ[CONFIG_FILE_ENV], f"env {CONFIG_FILE_ENV}"
        return None, "none"

    def store_url(self) -> tuple[str | None, str]:
        """(URL, source) of the store; URL None when the config file describes it."""
        if self.store_option:
            return self.store_option, "--store"
        if self.config_option:
            return None, "--config"
        if os.environ.get(STORE_ENV):
            return os.environ[STORE_ENV], f"env {STORE_ENV}"
        if os.environ.get(CONFIG_FILE_ENV):
            return None, f"env {CONFIG_FILE_ENV}"
        return default_store_path(), "default (user cache dir)"

    def config(self) -> LMCacheEngineConfig:
        """Effective config: the YAML file (if any), then ``LMCACHE_<FIELD>`` variables."""
        if self._config is None:
            env: dict[str, str] = dict(os.environ)
            path, _ = self.config_file()
            env.pop(CONFIG_FILE_ENV, None)
            if path:
                env[CONFIG_FILE_ENV] = path
            self._config = LMCacheEngineConfig.from_env(env)
        return self._config

    # -- what commands use ---------------------------------------------------------

    def output(self, fmt: OutputFormat | None = None) -> Output:
        """The output helper; a command's own ``--format`` beats the global one."""
        return Output(fmt or self.fmt, self.quiet)

    def open_store(self, url: str | None = None) -> Store:
        """The store the options name (or ``url``)."""
        from lmcache_core.store_ops import Store

        if url is not None:
            return Store(url, self.config())
        store_url, _ = self.store_url()
        return Store(store_url, self.config())


def get_state(ctx: typer.Context) -> CliState:
    obj: Any = ctx.find_root().obj
    if not isinstance(obj, CliState):  # a command invoked without the root callback
        obj = CliState()
        ctx.find_root().obj = obj
    return obj


def check_exclusive(store: str | None, config: str | None) -> None:
    """Reject ``--store`` with ``--config``, and empty values of either (usage errors)."""
    # An empty value (``--store "$UNSET"``) must not fall back to the default store:
    # ``lmcache --store "$UNSET" evict '*' --yes`` would wipe the user's cache.
    for name, value, want in (("--store", store, "a directory or URL"), ("--config", config, "a YAML file")):
        if value is not None and not value.strip():
            raise usage_error(f"{name}: empty value; give {want}")
    if store and config:
        raise usage_error("give --store or --config, not both (--config describes the store itself)")
