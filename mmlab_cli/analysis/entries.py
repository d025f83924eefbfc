"""The analyses a sweep (or any caller) can run by name, in the order a sweep runs them: each name's Settings
dataclass (its flags, mmlab_cli/analysis/settings.py) and its library entry (`analyse_<name>(run_dirs,
settings, options)`). `call(name, run_dirs, args, **fixed)` runs one from command-line arguments, parsed with
the flags its command has (the sweep file's argument lists)."""

from __future__ import annotations

from mmlab_cli.analysis.flatness_run import analyse_flatness
from mmlab_cli.analysis.geometry_run import analyse_geometry
from mmlab_cli.analysis.robustness_run import analyse_robustness
from mmlab_cli.analysis.runs import Analysed
from mmlab_cli.analysis.settings import FlatnessSettings, GeometrySettings, RobustnessSettings, RunOptions
from mmlab_cli.options import flags, from_flags, parse_args

ANALYSES = {"flatness": (FlatnessSettings, analyse_flatness),
            "robustness": (RobustnessSettings, analyse_robustness),
            "geometry": (GeometrySettings, analyse_geometry)}


def settings_from_args(name: str, args: list[str], **fixed) -> tuple:
    """(settings, options) of `mmlab <name> RUN <args>`, checked; `fixed` sets options (e.g. the device). A
    usage error is click's exception, a bad value a one-line MmlabError."""
    settings_class, _ = ANALYSES[name]
    given = parse_args(flags(settings_class, RunOptions), name, args)
    options = from_flags(RunOptions, given)
    for key, value in fixed.items():
        setattr(options, key, value)
    return from_flags(settings_class, given).check(), options.check()


def call(name: str, run_dirs, args: list[str], **fixed) -> Analysed:
    """Run analysis `name` on `run_dirs` as `mmlab <name> RUN_DIRS <args>` would."""
    settings, options = settings_from_args(name, args, **fixed)
    return ANALYSES[name][1](run_dirs, settings, options)
