"""
nanoGPT-style configuration: a script's globals are the defaults, a config file overrides
some of them, then --key=value arguments override those. Used by train.py:

    python train.py config/shakespeare.py --batch_size=4 --teacher=/path/to/model

Unlike nanoGPT, nothing from the command line is exec'd: values are parsed with
ast.literal_eval (a bare word that is not a Python literal is taken as a string). Config
files are plain Python, run in a namespace of their own. Every key must already exist and
keep its type (an int is accepted where a float is expected); anything else is one clear
error naming the valid keys.
"""
import ast
import difflib
from pathlib import Path


def _check(key, value, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SystemExit(f"indra: unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(sorted(defaults))}")
    expected = type(defaults[key])
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:
        raise SystemExit(f"indra: {key} in {where} must be {expected.__name__}, got {value!r} "
                         f"({type(value).__name__}); e.g. --{key}={defaults[key]!r}")
    return value


def config_file(path):
    """The settings a config file makes: its plain top-level names (not _private, functions or modules)."""
    namespace = {'__file__': str(path)}  # a config may start from another: see config/shakespeare_features.py
    exec(compile(Path(path).read_text(), str(path), 'exec'), namespace)
    return {key: value for key, value in namespace.items()
            if not key.startswith('_') and not callable(value) and type(value).__name__ != 'module'}


def configure(defaults, argv):
    """defaults: {key: default value}; argv: config files and --key=value strings, in order.
    Returns {key: value} for every key that was overridden."""
    overrides = {}
    for arg in argv:
        if not arg.startswith('--'):
            path = Path(arg)
            if not path.is_file():
                raise SystemExit(f"indra: config file {arg!r} not found; give a path like config/shakespeare.py")
            for key, value in config_file(path).items():
                overrides[key] = _check(key, value, defaults, arg)
            continue
        key, eq, text = arg[2:].partition('=')
        if not eq:
            raise SystemExit(f"indra: argument {arg!r} has no value; write --{key}=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as --teacher=smollm2-135m-instruct
        if isinstance(defaults.get(key), str) and not isinstance(value, str):
            value = text  # a str setting keeps what was typed, e.g. --out_dir=2024
        overrides[key] = _check(key, value, defaults, arg)
    return overrides
