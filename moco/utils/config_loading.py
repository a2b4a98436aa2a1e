"""Config files as untrusted input: safe YAML only (with ``_BASE_`` chains), one-line errors
naming the file and the closest keys of a mistyped one. Every config loader of the toolkit
(pretraining, detection, pipeline and ablation presets) goes through these.
"""

import difflib
import os
import re

import yaml
from fvcore.common.config import BASE_KEY


def load_config(defaults, config_file=None, opts=None, what="config file", keys="moco/config.py"):
    """``defaults()``, then ``config_file`` (YAML with optional ``_BASE_``), then ``KEY VALUE``
    opts. Errors are one line naming the file as ``what`` (e.g. ``--preset``) and where the keys
    are defined (``keys``)."""
    cfg = defaults()
    if config_file:
        merge_config_file(cfg, config_file, what, keys)
    if opts:
        merge_opts(cfg, opts, keys)
    return cfg


def merge_config_file(cfg, path, what="config file", keys="moco/config.py"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    check_safe_yaml(path, what)
    try:
        # allow_unsafe=False: fvcore must never fall back to yaml.unsafe_load (Detectron2's
        # CfgNode defaults to True); check_safe_yaml already refused tags with a clear line.
        cfg.merge_from_file(path, allow_unsafe=False)
    except (KeyError, AssertionError, ValueError) as e:  # yacs: unknown key, type mismatch
        raise ValueError(f"{what} {path}: {_reason(e)}{key_hint(cfg, e, keys)}") from None


def check_safe_yaml(path, what="config file", _chain=()):
    """Parse ``path`` and its ``_BASE_`` chain with ``yaml.SafeLoader`` only; one-line ValueError
    for a tagged value (``!!python/object/apply:...``: code), a syntax error, a non-mapping file, a
    URL base or a ``_BASE_`` cycle. Configs are shared like checkpoints, so they are untrusted: safe
    YAML builds plain values only and never runs anything. Bases resolve as fvcore's do (relative
    to the file that names them, ``~`` expanded)."""
    real = os.path.realpath(path)
    if real in _chain:
        cycle = " -> ".join(
            [*(os.path.basename(p) for p in _chain[_chain.index(real) :]), os.path.basename(real)]
        )
        raise ValueError(f"{what} {_chain[0]}: _BASE_ cycle ({cycle})")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{what} {_chain[-1] if _chain else path}: _BASE_ {path} does not exist"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=yaml.SafeLoader)
    except yaml.constructor.ConstructorError as e:
        line = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise ValueError(
            f"{what} {path}: {line}{_reason_text(e.problem)}; configs are read as safe "
            "YAML (plain values only) and nothing in them is run"
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{what} {path}: invalid config (not valid YAML: {_reason_text(str(e))})"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{what} {path}: expected a mapping of KEY: value, got {type(data).__name__}"
        )
    bases = data.get(BASE_KEY, [])
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str):
            raise ValueError(f"{what} {path}: _BASE_ must be a file name, got {base!r}")
        if base.startswith(("https://", "http://")):
            raise ValueError(f"{what} {path}: _BASE_ {base}: only local files (no URLs)")
        base = os.path.expanduser(base)
        if not base.startswith("/"):
            base = os.path.join(os.path.dirname(path), base)
        check_safe_yaml(base, what, (*_chain, real))


def merge_opts(cfg, opts, keys="moco/config.py"):
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs, got an odd list: {opts}")
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError) as e:  # yacs: unknown key, type mismatch
        raise ValueError(
            f"config override {' '.join(map(str, opts))}: {_reason(e)}{key_hint(cfg, e, keys)}"
        ) from None


def all_keys(cfg, prefix=""):
    """Every leaf key of a CfgNode, dotted (``SOLVER.BASE_LR``)."""
    for k, v in cfg.items():
        if isinstance(v, dict):
            yield from all_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def key_hint(cfg, exc, keys=None):
    """For yacs' "Non-existent config key: X": the closest existing keys (difflib), so a typo is
    answered with its fix; else where the keys are defined (``keys``), if given."""
    match = re.search(r"Non-existent (?:config )?key: (\S+)", _reason(exc))
    wrong = match.group(1).upper() if match else ""
    known = list(all_keys(cfg))
    close = difflib.get_close_matches(wrong, known, n=3, cutoff=0.8) if wrong else []
    if not close and wrong:
        # a short name of a longer key is no typo to difflib (SOLVER.LR vs SOLVER.BASE_LR):
        # keys of the same section that share a word of the name
        section, _, leaf = wrong.rpartition(".")
        words = set(leaf.split("_"))
        close = [
            k
            for k in known
            if k.rpartition(".")[0] == section and words & set(k.rpartition(".")[2].split("_"))
        ][:3]
    if close:
        return f"; did you mean {' or '.join(close)}?"
    return f" (keys: {keys})" if keys else ""


def _reason(exc):
    return _reason_text(exc.args[0] if exc.args else type(exc).__name__)


def _reason_text(text):
    return " ".join(str(text).split())
