"""Global options: which store, which config, how to print. Resolved once per run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lmcache_cli.errors import CliError, usage_error
from lmcache_cli.output import Output, OutputFormat
from lmcache_core.config import CONFIG_FILE_ENV, ENV_PREFIX, LMCacheEngineConfig

if TYPE_CHECKING:
    from lmcache_core.store_ops import Store

STORE_ENV = "LMCACHE_STORE"
#: The config fields that choose tiers. Set as ``LMCACHE_<FIELD>`` without a config
#: file, they describe the store, as they do for LMCache itself (``from_env``).
TIER_FIELDS = ("local_device", "local_disk", "remote_url")
DEFAULT_STORE_SOURCE = "default (user cache dir)"

FormatOption = Annotated[
    OutputFormat | None,
    typer.Option("--format", metavar="human|json", help="Output: human (tables) or json (one document on stdout, for scripts)."),
]


def default_store_path() -> str:
    """The default disk store: ``$XDG_CACHE_HOME/lmcache`` (platformdirs' user cache dir)."""
    from platformdirs import user_cache_dir

    return user_cache_dir("lmcache", appauthor=False)


def env_tier_vars() -> list[str]:
    """The ``LMCACHE_<FIELD>`` variables set (non-empty) for the fields that choose tiers,
    when one of them names a tier that outlives this process (a directory or a remote).

    ``LMCACHE_LOCAL_DEVICE=cpu`` (or ``cuda``) alone is LMCache's default memory tier:
    as the CLI's store it would be an in-process cache that loses every put on exit,
    so it does not move the CLI off its default directory.
    """
    names = [ENV_PREFIX + name.upper() for name in TIER_FIELDS]
    given = [name for name in names if os.environ.get(name)]
    device = os.environ.get(ENV_PREFIX + "LOCAL_DEVICE", "")
    persistent = [
        name for name in given if not name.endswith("LOCAL_DEVICE") or device.startswith("file://")
    ]
    return given if persistent else []


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
        tier_vars = env_tier_vars()
        if tier_vars:  # an LMCache deployment configured by variables alone (no YAML)
            return None, "env " + ", ".join(tier_vars)
        return default_store_path(), DEFAULT_STORE_SOURCE

    def ignored_env_tiers(self) -> tuple[list[str], str]:
        """(variables, why): ``LMCACHE_<FIELD>`` tier variables that do not describe the
        store because ``--store`` or ``LMCACHE_STORE`` names it; ([], "") when none."""
        _, source = self.store_url()
        if source not in ("--store", f"env {STORE_ENV}"):
            return [], ""
        return env_tier_vars(), f"{source} names the store"

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

    def open_store(self, url: str | None = None, *, must_exist: bool = False) -> Store:
        """The store the options name (or ``url``).

        Args:
            must_exist: for commands that only read or remove (``ls``, ``stats``,
                ``lookup``...): a disk store (or a config's disk tier with no remote
                behind it) whose directory does not exist is an error rather than an
                empty store, so a mistyped ``--store`` never reads as "empty" or
                "verified". The default store that does not exist yet is simply empty.

        Raises:
            CliError: ``must_exist`` and the store's directory does not exist.
        """
        from lmcache_core.store_ops import Store

        if url is not None:
            return Store(url, self.config())
        store_url, source = self.store_url()
        ignored, why = self.ignored_env_tiers()
        if ignored:
            named_by = source.removeprefix("env ")
            self.output().warn(
                f"{', '.join(ignored)} ignored: {why} (without {named_by}, LMCACHE_<FIELD> tier variables describe it)"
            )
        store = Store(store_url, self.config())
        if must_exist and source != DEFAULT_STORE_SOURCE:
            _check_store_directory(store, source)
        return store


def _check_store_directory(store: Store, source: str) -> None:
    """Raise when the store is a disk directory (or a config's disk tier with no remote
    behind it) that does not exist."""
    cfg = store.config
    if store.url is None and cfg.disk_path and not cfg.remote_url:
        # The config's disk tier is the store (a memory tier in front is this process's
        # own). In front of a remote it is a local cache, which a fresh node lacks: the
        # remote is still there to list, so that is no error.
        path = os.path.abspath(os.path.expanduser(cfg.disk_path))
        field_name = "local_disk" if cfg.local_disk else "local_device"
        origin = f"{field_name} ({cfg.sources.get(field_name, source)})"
    elif store.root is not None:
        path, origin = store.root, source
    else:
        return
    if not os.path.isdir(path):  # (a path that is a file is refused by Store itself)
        raise CliError(f"no such store directory: {path}; check {origin}")


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
