"""One vocabulary for run settings: flags, ``--config`` files and errors.

Every `RunConfig` field is one setting with one name, the key of ``[tool.flwr.app.config]``
in pyproject.toml (`silotune.config.flower_key`). This module generates the ``silotune
simulate`` flags from `silotune.config.SETTINGS` (``--num-silos``, plus the older aliases
such as ``--silos``), reads ``--config run.toml`` files with the same keys (those of ``flwr
run --run-config``), builds the `RunConfig` with the precedence defaults < file < flags,
and rewrites configuration errors into the name the user wrote (``--silos``, or
``'num-silos' in run.toml``), never the internal field name (docs/architecture.md,
convention 3).

Only the standard library and `silotune.config` at import: building the parser and
checking the arguments import no torch, transformers, Flower or Ray (registries that own
the valid names of a setting are imported when their names are needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from silotune.config import SETTINGS, ConfigError, RunConfig, flower_key

FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "extra")
_BY_KEY = {flower_key(name): name for name in FIELDS}


class InputError(ValueError):
    """A bad argument or input file, said in the user's words (one line, exit status 2)."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (the flag and the fix), not the
    whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _strategies() -> list[str]:
    from silotune import strategies

    return list(strategies.available())


def _partitioners() -> list[str]:
    from silotune.simulations.partition import PARTITIONERS

    return sorted(PARTITIONERS)


def _precisions() -> list[str]:
    from silotune.ml.precision import PRECISIONS

    return list(PRECISIONS)


def _profile_mixes() -> list[str]:
    from silotune.planning.profiles import MIXES

    return ["", "node", *sorted(MIXES)]  # "": off; "node": each silo's node config


# The registries that own a setting's valid names (Setting.registry).
REGISTRIES: dict[str, Callable[[], list[str]]] = {
    "strategies": _strategies,
    "partitioners": _partitioners,
    "precisions": _precisions,
    "profile mixes": _profile_mixes,
}


def option_strings(name: str) -> tuple[str, ...]:
    """The flags of field `name`: ``--<flower key>`` first, then its aliases."""
    return (f"--{flower_key(name)}", *SETTINGS[name].aliases)


def valid_names(name: str) -> list[str] | None:
    """The valid values of field `name` when a fixed list or a registry owns them."""
    setting = SETTINGS[name]
    if setting.registry:
        return REGISTRIES[setting.registry]()
    return list(setting.choices) or None


_METAVARS = {int: "N", float: "X"}


def add_setting_flags(parser: argparse.ArgumentParser | Any,
                      names: Iterable[str] = FIELDS) -> None:
    """Add one flag per field in `names` to `parser` (a parser or an argument group).

    Flags default to "not given" (``argparse.SUPPRESS``) so that a ``--config`` file's
    value is kept unless the flag overrides it; the help text shows the default.
    """
    missing = [n for n in FIELDS if n not in SETTINGS]
    if missing:  # a new RunConfig field needs its Setting (help, flag) in silotune/config.py
        raise RuntimeError(f"RunConfig fields without a Setting in silotune/config.py: "
                           f"{', '.join(missing)}")
    defaults = RunConfig()
    written = defaults.to_flower()  # the defaults as Flower's run config writes them
    for name in names:
        setting, default = SETTINGS[name], getattr(defaults, name)
        names_text = ""
        if setting.registry:
            shown = [n for n in REGISTRIES[setting.registry]() if n]
            names_text = f": {', '.join(shown)}"
        default_text = str(written[flower_key(name)]) or "off"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": f"{setting.help}{names_text} ({default_text})"}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = setting.metavar or _METAVARS.get(type(default), "NAME")
            if setting.choices:
                kwargs["choices"] = setting.choices
                kwargs.pop("metavar")
        parser.add_argument(*option_strings(name), **kwargs)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: settings from a TOML file (keys of ``[tool.flwr.app.config]``)."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="read settings from a TOML file with the keys of "
                        "[tool.flwr.app.config] in pyproject.toml (e.g. num-silos = 6); "
                        "flags override it")


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings of a ``--config`` TOML file, keyed by field name.

    Raises
    ------
    InputError
        The file is missing or not TOML, or a key is not a setting (named, with the
        closest valid key).
    """
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"--config {path}: file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"--config {path}: cannot read it as TOML: {err}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = _BY_KEY.get(key, key.replace("-", "_"))
        if name not in FIELDS:
            raise InputError(f"--config {path}: unknown key '{key}'{_did_you_mean(key)}; "
                             f"valid keys are those of [tool.flwr.app.config]: "
                             f"{', '.join(sorted(_BY_KEY))}")
        values[name] = value
    return values


def _did_you_mean(key: str) -> str:
    spelled = {flower_key(n): flower_key(n) for n in FIELDS}
    spelled |= {alias.lstrip("-"): flower_key(n) for n in FIELDS for alias in
                SETTINGS[n].aliases}
    close = difflib.get_close_matches(key.replace("_", "-"), spelled, n=1, cutoff=0.6)
    return f" (did you mean '{spelled[close[0]]}'?)" if close else ""


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where each setting's value came from, to name it as the user wrote it."""

    argv: Sequence[str]
    file: Path | None = None
    file_keys: frozenset[str] = frozenset()

    def flag_used(self, name: str) -> str | None:
        """The option string of field `name` that is on the command line, if any."""
        for arg in self.argv:
            for option in option_strings(name):
                if arg == option or arg.startswith(option + "="):
                    return option
        return None

    def given(self, name: str) -> bool:
        """Whether the user set field `name` (by a flag or in the ``--config`` file)."""
        return self.flag_used(name) is not None or name in self.file_keys

    def name(self, name: str) -> str:
        """Field `name` as the user knows it: the flag given, the file key, or the flag."""
        if flag := self.flag_used(name):
            return flag
        if name in self.file_keys:
            return f"'{flower_key(name)}' (in {self.file})"
        return option_strings(name)[0]


def in_user_terms(message: str, sources: Sources) -> str:
    """`message` with every field name (``num_silos``, ``'num-silos'``) replaced by the
    name the user wrote (`Sources.name`)."""

    def quoted(match: re.Match[str]) -> str:
        key, equals = match.group(1), match.group(2) or ""
        name = _BY_KEY.get(key, key.replace("-", "_"))
        if name not in FIELDS:
            return match.group(0)
        said = sources.name(name)
        return said if said.startswith("--") else said + equals  # "--silos 0", "'k' = 0"

    message = re.sub(r"(?:config key )?'([a-z][a-z0-9_-]*)'( =)?", quoted, message)
    return re.sub(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b",
                  lambda m: sources.name(m.group(0)) if m.group(0) in FIELDS else m.group(0),
                  message)


def run_config(args: argparse.Namespace, argv: Sequence[str]) -> tuple[RunConfig, Sources]:
    """The `RunConfig` of parsed `args`: defaults < ``--config`` file < flags given.

    Raises
    ------
    InputError
        A bad file, key or value, named as the user wrote it.
    """
    path: Path | None = getattr(args, "config", None)
    values = read_config_file(path) if path is not None else {}
    sources = Sources(list(argv), path, frozenset(values))
    given = {k: v for k, v in vars(args).items() if v is not False}  # store_true not given
    values |= {name: given[name] for name in FIELDS if name in given}
    try:
        cfg = RunConfig.from_mapping(values)
    except ConfigError as err:
        raise InputError(in_user_terms(str(err), sources)) from None
    for name in FIELDS:
        valid = valid_names(name) if name in values else None
        if valid is not None and getattr(cfg, name) not in valid:
            listed = ", ".join(repr(v) if v == "" else v for v in valid)
            raise InputError(f"{sources.name(name)} {getattr(cfg, name)!r} is unknown; "
                             f"valid: {listed}")
    return cfg, sources


def summary(cfg: RunConfig) -> str:
    """The settings that differ from the defaults, as ``key=value`` (one short line)."""
    defaults = RunConfig().to_flower()
    changed = [f"{k}={v}" for k, v in cfg.to_flower().items() if v != defaults[k]]
    return " ".join(changed) if changed else "all defaults"


def fail(job: str, err: Exception | str) -> int:
    """Print `err` as the one-line error of `job`; the exit status 2."""
    print(f"silotune {job}: error: {err}", file=sys.stderr)
    return 2



def check_inputs(cfg: RunConfig, sources: Sources,
                 emit: Callable[[str], object] = print) -> RunConfig:
    """Check what a simulation reads before it starts (no torch, Flower or Ray): the
    strategy's rank needs, the model name or folder, the data file, the held-out size and
    the split over the silos. Returns `cfg`, with the held-out size the data set gives
    when the default one is too large (said through `emit`; metrics.json records it).

    Raises
    ------
    InputError
        Naming the flag (or ``--config`` key) to change.
    """
    from silotune import strategies
    from silotune.adapters.types import AdapterError
    from silotune.ml.assets import MODELS, AssetError, resolve_model

    name = sources.name
    ranks = {f"silo-{i:03d}": cfg.rank_of(i) for i in range(min(cfg.num_silos,
                                                                len(cfg.lora_ranks)))}
    try:
        strategies.create(cfg.strategy).setup(ranks, {}, cfg.seed)  # e.g. equal-rank rules
    except AdapterError as err:
        raise InputError(f"{name('strategy')} {cfg.strategy}: "
                         f"{in_user_terms(str(err), sources)}") from None
    try:
        if cfg.model not in MODELS:  # a registered model is converted later, once
            resolve_model(cfg.model)
    except AssetError as err:
        raise InputError(f"{name('model')}: {err}") from None
    from silotune.ml.data import held_out_split

    try:
        split = held_out_split(cfg.dataset, cfg.text_column, cfg.label_column, cfg.test_size,
                               cfg.seed)
    except AssetError as err:
        raise InputError(f"{name('dataset')}: {in_user_terms(str(err), sources)}") from None
    rows, held_out = len(split.train) + len(split.test), len(split.test)
    if held_out < cfg.test_size:
        why = (f"{cfg.dataset} has {rows} rows and can hold out at most {held_out} (half "
               "the rows, from labels with 2 or more rows)")
        if sources.given("test_size"):
            raise InputError(f"{name('test_size')} {cfg.test_size}: {why}; use "
                             f"{name('test_size')} {held_out} or less")
        emit(f"[data] held-out size {held_out}, not the default test-size {cfg.test_size}: "
             f"{why}; metrics.json records {held_out}")
        cfg = dataclasses.replace(cfg, test_size=held_out)
    if cfg.num_silos > len(split.train):
        raise InputError(f"{name('num_silos')} {cfg.num_silos}: {cfg.dataset} has {rows} "
                         f"rows, {held_out} held out for evaluation, so at most "
                         f"{len(split.train)} silos get a training row; use fewer silos or "
                         "more data")
    from silotune.simulations.federation import federated_task

    try:
        federated_task(cfg)  # cached: the simulation reuses this split
    except ValueError as err:
        raise InputError(f"{name('num_silos')} {cfg.num_silos} with {name('partition')} "
                         f"{cfg.partition}: {in_user_terms(str(err), sources)}") from None
    return cfg
