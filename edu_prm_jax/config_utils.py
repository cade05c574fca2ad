"""Config files as code: locate and load `configs/<name>.py[:arg]`, list fields, read their `# comments`.

The shipped configs are the package `edu_prm_jax.configs` (one file per command, found wherever the package is
installed); `configs/<file>.py` on the command line names one of them unless the current directory has a file
at that path. Every config documents each field with a `# comment` on the line that sets it; those comments are
the field docs `edu-prm <cmd> --help` prints, read from the source so that they cannot drift from the code.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
import io
import json
import os
import pathlib
import textwrap
import tokenize
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import ml_collections

from edu_prm_jax.io.atomic import write_text_atomic

SHIPPED_CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"  # the edu_prm_jax.configs package
SHIPPED_PREFIX = "configs"  # `configs/<file>.py` names a shipped config (when no such file is under the cwd)


class ConfigFileError(ValueError):
    """A config file that cannot be found or loaded, or an override that names no field."""


# ------------------------------------------------------------------------------------------- locating
def shipped_config(name: str) -> pathlib.Path:
    """The shipped config file of command `name` (`eval-bon` -> .../edu_prm_jax/configs/eval_bon.py)."""
    return SHIPPED_CONFIGS / f"{name.replace('-', '_')}.py"


def resolve_config_path(path: str | os.PathLike) -> pathlib.Path:
    """The config file `path` names: as given (absolute, or relative to the current dir); else, for
    `configs/<file>.py`, the shipped config of that name (edu_prm_jax/configs/<file>.py)."""
    p = pathlib.Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [pathlib.Path.cwd() / p]
    if not p.is_absolute() and len(p.parts) > 1 and p.parts[0] == SHIPPED_PREFIX:
        candidates.append(SHIPPED_CONFIGS.joinpath(*p.parts[1:]))
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    shipped = sorted(f.name for f in SHIPPED_CONFIGS.glob("*.py") if not f.name.startswith("_"))
    raise ConfigFileError(f"config file {str(path)!r} not found (looked at {tried}); shipped configs: "
                          f"{', '.join(SHIPPED_PREFIX + '/' + f for f in shipped)}")


def split_config_spec(spec: str) -> tuple[str, str | None]:
    """'configs/x.py:arg' -> ('configs/x.py', 'arg'); the ml_collections config_flags convention."""
    path, sep, arg = spec.partition(":")
    return path, (arg if sep else None)


# ------------------------------------------------------------------------------------------- loading
def load_config_module(path: pathlib.Path) -> ModuleType:
    name = f"_edu_prm_config_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigFileError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:  # file:line: message, not an importlib traceback
        raise ConfigFileError(f"{e.filename or path}:{e.lineno}: {e.msg}"
                              + (f"\n    {e.text.rstrip()}" if e.text else "")) from None
    except ImportError as e:  # e.g. `from configs import common`, the layout before configs moved
        if e.name == SHIPPED_PREFIX or (e.name or "").startswith(SHIPPED_PREFIX + "."):
            raise ConfigFileError(f"{path}: {e}; the shipped configs are the package edu_prm_jax.configs "
                                  f"(e.g. `from edu_prm_jax.configs import common`)") from None
        raise
    if not callable(getattr(module, "get_config", None)):
        raise ConfigFileError(f"{path}: defines no get_config() function")
    return module


def load_config(spec: str) -> tuple[ml_collections.ConfigDict, pathlib.Path, ModuleType]:
    """(config, resolved file, module) for 'path[:arg]': `get_config(arg)` when an arg is given, else
    `get_config()`, as ml_collections' DEFINE_config_file does."""
    path_str, arg = split_config_spec(spec)
    return load_config_file(resolve_config_path(path_str), arg)


def load_config_file(path: pathlib.Path, arg: str | None = None
                     ) -> tuple[ml_collections.ConfigDict, pathlib.Path, ModuleType]:
    """`load_config` of a file already located (its path may hold a ':')."""
    if not path.is_file():
        raise ConfigFileError(f"config file {str(path)!r} not found")
    module = load_config_module(path)
    config = module.get_config(arg) if arg is not None else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config, path, module


# ------------------------------------------------------------------------------------------- fields
def iter_leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """('mesh.data', -1) for every non-ConfigDict field, depth first in definition order."""
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from iter_leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def leaf_keys(config: ml_collections.ConfigDict) -> list[str]:
    return [k for k, _ in iter_leaves(config)]


def field_type_name(config: ml_collections.ConfigDict, dotted: str) -> str:
    *parents, last = dotted.split(".")
    holder = config
    for p in parents:
        holder = holder[p]
    try:
        t = holder.get_type(last)
    except (AttributeError, KeyError, TypeError):
        return "?"
    return getattr(t, "__name__", str(t))


def nearest_keys(key: str, valid: list[str], n: int = 3) -> list[str]:
    """Valid keys closest to a misspelled one: a key with the same last part first ('sample.policy' -> 'policy',
    'fsdp' -> 'mesh.fsdp'), then by whole path, then by similar last part."""
    last = key.rsplit(".", 1)[-1]
    same = [k for k in valid if k.rsplit(".", 1)[-1] == last][:1]
    close = same + [k for k in difflib.get_close_matches(key, valid, n=n, cutoff=0.5) if k not in same]
    by_last = {k.rsplit(".", 1)[-1]: k for k in reversed(valid)}
    for m in difflib.get_close_matches(last, list(by_last), n=n, cutoff=0.6):
        if by_last[m] not in close:
            close.append(by_last[m])
    return close[:n]


def check_override_keys(keys: list[str], config: ml_collections.ConfigDict, source: str) -> None:
    """Raise ConfigFileError naming the first override key that is not a config field, with suggestions."""
    valid = leaf_keys(config)
    groups = {k.rsplit(".", i)[0] for k in valid for i in range(1, k.count(".") + 1)}
    for key in keys:
        if key in valid:
            continue
        if key in groups:
            raise ConfigFileError(f"--config.{key}: is a group of fields in {source}, override one of "
                                  f"{[k for k in valid if k.startswith(key + '.')][:6]}")
        hint = nearest_keys(key, valid)
        did = f"; did you mean {', '.join('--config.' + h for h in hint)}?" if hint else ""
        raise ConfigFileError(f"--config.{key}: no such field in {source}{did}")


# ------------------------------------------------------------------------------------------- comments
def _line_comments(source: str) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _attr_chain(node: ast.AST) -> tuple[str, list[str]] | None:
    """`config.mesh.data` -> ('config', ['mesh', 'data'])."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and parts:
        return node.id, parts[::-1]
    return None


def _resolve_callable(node: ast.AST, namespace: dict[str, Any]) -> Callable[..., Any] | None:
    """The Python function a call like `common.mesh_config(...)` names, if it is a plain config helper."""
    chain = _attr_chain(node) if isinstance(node, ast.Attribute) else ((node.id, []) if isinstance(
        node, ast.Name) else None)
    if chain is None or chain[0] not in namespace:
        return None
    obj = namespace[chain[0]]
    for part in chain[1]:
        obj = getattr(obj, part, None)
    if not inspect.isfunction(obj) or obj.__module__.startswith("ml_collections"):
        return None
    return obj


def _comment_for(node: ast.AST, comments: dict[int, str]) -> str | None:
    for line in (node.lineno, getattr(node, "end_lineno", node.lineno)):
        if line in comments:
            return comments[line]
    return None


def _dict_fields(node: ast.Dict, prefix: str, comments: dict[int, str], namespace: dict[str, Any],
                 out: dict[str, str], depth: int) -> None:
    for k, v in zip(node.keys, node.values):
        if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
            continue
        name = prefix + k.value
        comment = comments.get(k.lineno) or _comment_for(v, comments)
        if comment:
            out[name] = comment
        _value_fields(v, name + ".", comments, namespace, out, depth)


def _value_fields(value: ast.AST, prefix: str, comments: dict[int, str], namespace: dict[str, Any],
                  out: dict[str, str], depth: int) -> None:
    """Fields documented inside a value: a dict literal, ConfigDict({...}), or a helper's return value."""
    if isinstance(value, ast.Dict):
        _dict_fields(value, prefix, comments, namespace, out, depth)
    elif isinstance(value, ast.Call):
        if value.args and isinstance(value.args[0], ast.Dict):
            _dict_fields(value.args[0], prefix, comments, namespace, out, depth)
        func = _resolve_callable(value.func, namespace)
        if func is not None and depth < 8:
            for k, c in function_field_comments(func, depth + 1).items():
                out.setdefault(prefix + k, c)


def function_field_comments(func: Callable[..., Any], depth: int = 0) -> dict[str, str]:
    """{'mesh.data': 'comment'} for the fields a config-building function sets on the dict it returns."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    comments = _line_comments(source)
    namespace = dict(func.__globals__)
    fdef = tree.body[0]
    returned = {n.value.id for n in ast.walk(fdef)
                if isinstance(n, ast.Return) and isinstance(n.value, ast.Name)}
    out: dict[str, str] = {}
    for node in ast.walk(fdef):
        if isinstance(node, ast.Return) and node.value is not None and not isinstance(node.value, ast.Name):
            _value_fields(node.value, "", comments, namespace, out, depth)
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            if isinstance(target, ast.Name) and target.id in returned and node.value is not None:
                _value_fields(node.value, "", comments, namespace, out, depth)
                continue
            chain = _attr_chain(target)
            if chain is None or chain[0] not in returned:
                continue
            name = ".".join(chain[1])
            comment = _comment_for(node, comments)
            if comment:
                out[name] = comment
            if node.value is not None:
                _value_fields(node.value, name + ".", comments, namespace, out, depth)
    return out


def field_comments(module: ModuleType) -> dict[str, str]:
    """Field docs of a config module's `get_config`, following helpers such as `common.mesh_config()`."""
    return function_field_comments(module.get_config)


def undocumented_fields(config: ml_collections.ConfigDict, comments: dict[str, str]) -> list[str]:
    return [k for k in leaf_keys(config) if k not in comments]


def describe_config(config: ml_collections.ConfigDict, comments: dict[str, str]) -> str:
    """One line per field, `--config.mesh.data=-1  (int)  comment`, after its group's comment when it has one."""
    lines: list[str] = []

    def walk(group: ml_collections.ConfigDict, prefix: str) -> None:
        for key in group.keys():
            value, dotted = group[key], prefix + key
            if isinstance(value, ml_collections.ConfigDict):
                if dotted in comments:
                    lines.append(f"  --config.{dotted}.*\n      {comments[dotted]}")
                walk(value, dotted + ".")
                continue
            shown = json.dumps(value) if isinstance(value, str | bool | type(None)) else repr(value)
            lines.append(f"  --config.{dotted}={shown}  ({field_type_name(config, dotted)})"
                         f"\n      {comments.get(dotted, '(undocumented)')}")

    walk(config, "")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- provenance
def check_ranges(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigFileError for the first numeric field outside its range (`configs/ranges.py`), naming the field,
    its value and the range. Called when a config is loaded, before any model loads; bools and unset fields are
    not numbers here."""
    from edu_prm_jax.configs.ranges import range_of

    for dotted, value in iter_leaves(config):
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        valid = range_of(dotted)
        if valid is not None and not valid.contains(value):
            raise ConfigFileError(f"config.{dotted}={value!r}: must be {valid.describe()}")


def write_config_json(config: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
    """The config as JSON, written atomically so a crash never leaves half a file."""
    write_text_atomic(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def parse_number_list(text: str, field: str, kind: type = int, allow_empty: bool = False) -> list:
    """A comma-separated config field ("4,16,64") as a list of `kind`; ValueError naming `config.<field>` for a
    value that does not parse, or for an empty list unless `allow_empty`."""
    try:
        values = [kind(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"config.{field}={text!r}: expected comma-separated {kind.__name__} values") from None
    if not values and not allow_empty:
        raise ValueError(f"config.{field} is empty")
    return values
