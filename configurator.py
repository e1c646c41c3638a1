"""
Typed configuration for every script, nanoGPT style without the exec of globals.

A script declares its settings as a dataclass with defaults. The command line is
    python train_x.py [config/preset.py] [--key=value ...]
A preset file is plain Python that assigns some of the keys (`batch_size = 32`). One preset can
describe a whole pipeline: a dict named `<section>_config` (e.g. `tokenizer_config = dict(...)`) applies
only to the config class whose `SECTION` class attribute is `<section>`; the other sections of SECTIONS
are skipped, so `python train_siglip.py config/shapes.py` and `python train_tokenizer.py config/shapes.py`
share a file. A dict named `<x>_config` for an x that is no section (`tokenzier_config`) is an error; any
other `..._config` value (eval.py's `siglip_config = "DIR"`) is an ordinary key. Then each
`--key=value` is parsed with the type of the dataclass field (so `--lr=3e-4` is a float and
`--compile=False` is a bool). An unknown key, in a preset or on the command line, is an error that
names the key and lists the valid ones: a typo must never train with the default silently.

A user's mistake (a bad value, a missing file, a damaged checkpoint) is a `UserError`; every command runs
under `run_main`, which prints it as one `error: <what> (<where>)` line on stderr and exits with code 2,
no traceback (`--debug=True` or NANO_DEBUG=1 shows it). Anything else is a bug and raises as usual.
"""
import ast
import dataclasses
import json
import os
import sys
import typing


class UserError(ValueError):
    """A mistake in what the user gave (command line, preset, data, paths), not a bug in the code. A
    ValueError, so callers that catch ValueError keep working."""


def run_main(main, argv=None):
    """Run `main(argv)` the way every command does: a UserError becomes `error: ...` on stderr and exit
    code 2. `--debug=True` (taken out of argv here, so no config needs the key) or NANO_DEBUG=1 re-raises
    it with its traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("NANO_DEBUG", "") not in ("", "0")
    rest = []
    for a in argv:
        key, _, val = a.partition("=")
        if key == "--debug":
            debug = val.lower() in ("", "1", "true", "yes", "on")
        else:
            rest.append(a)
    try:
        return main(rest)
    except UserError as e:
        if debug:
            raise
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(2)


def _parse_value(name, text, ftype):
    """Turn the string `text` into a value of the dataclass field type `ftype`."""
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin is typing.Union or (origin is not None and type(None) in args):  # Optional[T]
        if text in ("None", "none", "null"):
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(name, text, inner[0])
    if ftype is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{name}: expected a bool (True/False), got {text!r}")
    if ftype is str:
        return text
    if ftype is int:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"--{name}: expected int, got {text!r}")
        return value
    if ftype is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{name}: expected float, got {text!r}") from None
    try:  # tuples, lists, dicts: a Python literal
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"--{name}: expected a Python literal of type {ftype}, got {text!r}") from None
    if origin in (tuple, list) and not isinstance(value, (tuple, list)):
        raise UserError(f"--{name}: expected a {origin.__name__}, got {text!r}")
    return origin(value) if origin in (tuple, list) else value


def _check_keys(cfg, keys, where):
    valid = {f.name for f in dataclasses.fields(cfg)}
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise UserError(f"unknown config key(s) {unknown} in {where}; valid keys: {sorted(valid)}")


SECTIONS = ("siglip", "tokenizer", "mllm")  # the `<section>_config` dicts of a pipeline preset (config/shapes.py)


def preset_values(path, section=None):
    """The names a preset file assigns (its `<section>_config` dict merged in), as a dict. Dicts of the
    other SECTIONS are skipped; a `<x>_config` dict for an unknown x is a UserError (a misspelt section
    would otherwise be skipped too, and the script would train with its defaults)."""
    if not os.path.isfile(path):
        raise UserError(f"preset file {path!r} does not exist")
    scope = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), scope)
    values, sections = {}, {}
    for k, v in scope.items():
        if k.startswith("_") or callable(v) or isinstance(v, type(sys)):
            continue
        if k.endswith("_config") and isinstance(v, dict):
            sections[k[:-len("_config")]] = v
        else:
            values[k] = v
    unknown = sorted(set(sections) - set(SECTIONS) - {section})
    if unknown:
        raise UserError(f"{path}: unknown section(s) {[s + '_config' for s in unknown]}; the sections are "
                        f"{[s + '_config' for s in SECTIONS]}")
    values.update(sections.get(section, {}) if section is not None else {})
    return values


def apply_preset(cfg, path):
    """Run the preset file and copy the names it assigns onto `cfg` (a dataclass instance)."""
    values = preset_values(path, getattr(cfg, "SECTION", None))
    _check_keys(cfg, values, path)
    for k, v in values.items():
        setattr(cfg, k, v)
    return cfg


def parse_config(cfg, argv=None):
    """Apply presets (`*.py` positional arguments) then `--key=value` overrides to `cfg`, in order."""
    argv = sys.argv[1:] if argv is None else argv
    hints = typing.get_type_hints(type(cfg))
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise UserError(f"expected a preset file (*.py) or --key=value, got {arg!r}")
            apply_preset(cfg, arg)
            continue
        if "=" not in arg:
            raise UserError(f"expected --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        _check_keys(cfg, [key], "the command line")
        setattr(cfg, key, _parse_value(key, text, hints[key]))
    return cfg


def read_lines(path, what):
    """A list argument given as a file (class names, templates, captions) -> its non-empty lines, stripped;
    a missing or empty file is a UserError naming `what`."""
    if not os.path.isfile(path):
        raise UserError(f"{what} file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if not lines:
        raise UserError(f"{what} file {path!r}: the file has no non-empty line")
    return lines


def read_jsonl_records(path, need=""):
    """A JSONL file the user gives (training pairs, QA lines) -> [(where "file:line", record dict)] of its
    non-blank lines. A missing file, a line that is not a JSON object, or no record at all is a UserError
    naming the file and line; `need` (what a record must hold) is added to those messages."""
    if not os.path.isfile(path):
        raise UserError(f"{path!r} does not exist")
    hint, out = f" (one JSON object per line: {need})" if need else "", []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not JSON ({e})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{n}: expected a JSON object{hint}, got {line.strip()[:80]!r}")
            out.append((f"{path}:{n}", rec))
    if not out:
        raise UserError(f"{path} holds no records{hint}")
    return out


def atomic_write(path, write):
    """Every file a user keeps goes through here: write(f) fills a temporary file in the same folder (same
    filesystem, so os.replace is atomic), which is fsynced, then replaces `path`. A crash mid-write leaves
    the previous file (a checkpoint, a result, a picture) intact and no half-written one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def config_dict(cfg):
    """Plain dict of a config, for JSON logs and checkpoints."""
    return dataclasses.asdict(cfg)
