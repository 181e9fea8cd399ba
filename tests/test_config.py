"""service/config/settings.py is the one answer to "what is the default of X": the CLI's flags read
their defaults from its dataclasses and map back onto them by field name, and the layers below import
its constants instead of writing their own."""

import argparse
import dataclasses
import inspect

from service import cli
from service.cli import serve
from service.config.settings import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_LOAD_TIMEOUT,
    DEFAULT_QUEUE_MAX,
    DEFAULT_SLOTS,
    ContextParams,
    PairRequest,
    ServerConfig,
    SpeculativeConfig,
)
from service.engine.engine import Engine
from service.engine.scheduler import Scheduler
from service.pairs.registry import PairRegistry


def _serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _defaults_by_dest(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


def test_every_server_setting_is_a_serve_flag_whose_default_is_the_configs():
    flags, config = _defaults_by_dest(_serve_parser()), ServerConfig()
    for f in dataclasses.fields(ServerConfig):
        if f.name in serve.SERVE_COMPUTED + serve.SERVE_UNFLAGGED:
            continue
        assert f.name in flags, f"ServerConfig.{f.name} has no `serve` flag (or is not listed as computed)"
        assert flags[f.name] == getattr(config, f.name), f"--{f.name}: the flag's default is not ServerConfig's"


def test_serve_with_no_flags_gives_the_default_server_config(tmp_path):
    model = tmp_path / "m.gguf"
    cfg = serve.serve_config(cli.build_parser().parse_args(["serve", "-m", str(model)]))
    default = ServerConfig()
    for f in dataclasses.fields(ServerConfig):
        if f.name not in serve.SERVE_COMPUTED:
            assert getattr(cfg, f.name) == getattr(default, f.name), f.name
    assert cfg.params == default.params == ContextParams(n_parallel=DEFAULT_SLOTS)
    assert cfg.params.n_parallel == _defaults_by_dest(_serve_parser())["parallel"] == DEFAULT_SLOTS
    assert cfg.speculative == SpeculativeConfig("ngram") == default.speculative
    assert cfg.startup.name == PairRequest.name and cfg.startup.params == cfg.params
    assert cfg.models_dir == str(tmp_path) and cfg.default_target == str(model)


def test_the_backend_default_is_the_same_for_the_config_serve_and_run():
    run = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    assert _defaults_by_dest(_serve_parser())["backend"] == _defaults_by_dest(run)["backend"] == ServerConfig.backend


def test_the_layers_below_take_their_defaults_from_the_config():
    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert default(Engine.__init__, "queue_max") == default(Scheduler.__init__, "queue_max") == DEFAULT_QUEUE_MAX
    assert default(PairRegistry.__init__, "queue_max") == ServerConfig.queue_max == DEFAULT_QUEUE_MAX
    assert default(PairRegistry.__init__, "load_timeout") == ServerConfig.load_timeout == DEFAULT_LOAD_TIMEOUT
    assert default(PairRegistry.unload, "drain_timeout") == ServerConfig.drain_timeout == DEFAULT_DRAIN_TIMEOUT
