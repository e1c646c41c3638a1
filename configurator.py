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
names the key and the closest valid ones: a typo must never train with the default silently.

A trainer's config holds its model's config in a field named `model` (TrainMLLMConfig.model: mllm.MLLMConfig),
so each model field is declared once, with the model's default. The keys are what `keys()` lists: the
trainer's own fields and the model config's fields, both by their own names (`--n_layer=4`: one flat
namespace, a name in both is a TypeError of the config class; train_tokenizer.py's `loss` field, the
objective's weights, is held the same way); a dataclass inside the model config is a group
whose keys carry its name (`--decoder.ch=64`, `--vq_pix.depth=4`), and the group's name takes a dict of some of
them (`decoder = dict(ch=64)` in a preset). A model field that the trainer fills from its data (the class's
DERIVED table: vocab_size from the text tokenizer) is no key, and naming it says where it comes from.
config_dict writes the keys the same way (the model's beside the trainer's, a group as a dict): what
train_state.pt, log.jsonl and eval.json record.

`--help` / `-h` anywhere on a command line prints what the script does (its docstring's summary and usage
lines), its commands if it has several (`command`), and every key: type, default, the value the given
presets and overrides set, and its meaning, which is the comment beside the field in the config class (a
comment block of its own lines heads a group of fields), so the help cannot drift from the source. It
never runs the script's job.

A user's mistake (a bad value, a missing file, a damaged checkpoint) is a `UserError`; every command runs
under `run_main`, which prints it as one `error: <what> (<where>)` line on stderr and exits with code 2,
no traceback (`--debug=True` or NANO_DEBUG=1 shows it). Ctrl-C is one line too (the step reached and the
last checkpoint, from PROGRESS), exit 130. Anything else is a bug and raises as usual.

Every file a user keeps is written by atomic_write (replaced whole or not at all); where a command may write
is folders.py's (an output never lands on an input or a model's files, one writer per folder).
"""
import ast
import copy
import dataclasses
import difflib
import inspect
import io
import json
import os
import shutil
import sys
import textwrap
import tokenize
import types
import typing


class UserError(ValueError):
    """A mistake in what the user gave (command line, preset, data, paths), not a bug in the code. A
    ValueError, so callers that catch ValueError keep working."""


# What a long command has reached, for the line Ctrl-C prints: a trainer keeps "step", "out_dir" and
# "checkpoint" (the step of its last train_state.pt, None before the first) up to date; an orchestrator
# (ablation.py) keeps "doing", what it is running now.
PROGRESS = {}


def interrupted_message():
    p = PROGRESS
    msg = "interrupted (Ctrl-C)"
    if p.get("doing"):
        msg += f" while {p['doing']}"
    if "step" in p:
        msg += f" at step {p['step']}"
        ck = p.get("checkpoint")
        state = os.path.join(p.get("out_dir", ""), "train_state.pt")
        msg += (f"; the last checkpoint is step {ck} ({state}): continue with --resume=True" if ck is not None
                else "; no checkpoint was written yet")
    return msg


def run_main(main, argv=None):
    """Run `main(argv)` the way every command does: a UserError becomes `error: ...` on stderr and exit
    code 2; Ctrl-C becomes `error: interrupted ...` (interrupted_message) and exit code 130, the shell's
    code for SIGINT. `--debug=True` (taken out of argv here, so no config needs the key) or NANO_DEBUG=1
    re-raises either with its traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("NANO_DEBUG", "") not in ("", "0")
    rest = []
    for a in argv:
        key, _, val = a.partition("=")
        if key == "--debug":
            debug = val.lower() in ("", "1", "true", "yes", "on")
        else:
            rest.append(a)
    PROGRESS.clear()
    try:
        return main(rest)
    except UserError as e:
        if debug:
            raise
        _close_progress_bars()
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        # without a bar to close, a newline: the terminal's line holds the echoed ^C
        print(("" if _close_progress_bars() else "\n") + "error: " + interrupted_message(), file=sys.stderr)
        sys.exit(130)


def _close_progress_bars():
    """Close the tqdm bars a loop left open when it was left by an exception (they would redraw themselves at
    exit, after the error line, which must be the last). -> how many were open."""
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()))
    for bar in bars:
        bar.close()
    return len(bars)


def _parse_value(name, text, ftype):
    """Turn the string `text` into a value of the dataclass field type `ftype`."""
    origin = typing.get_origin(ftype) or (ftype if ftype in (tuple, list) else None)  # a bare `tuple` field too
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


# the fields of a trainer's config holding a component's config whose fields are keys by their own names (see
# the module docstring): its model's config, and train_tokenizer.py's loss weights (losses.LossConfig)
FLAT = ("model", "loss")


def keys(cfg):
    """Every key of a config -> {key: (the dataclass instance that holds it, its field name, its type)}, in
    source order. A field holding a dataclass is a group: the fields of a FLAT group (`model`, `loss`) are keys
    of their own names (n_layer); the fields of any other group are named with its name and a dot (decoder.ch),
    and the group's name is a key too, taking a dict of some of them. The DERIVED table's names are no keys."""
    derived, out = getattr(type(cfg), "DERIVED", {}), {}

    def walk(obj, prefix):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            key, v = prefix + f.name, getattr(obj, f.name)
            if key in derived:
                continue
            if not (obj is cfg and f.name in FLAT):
                if key in out:  # a config class's mistake, not the user's
                    raise TypeError(f"{type(cfg).__name__}: two keys named {key!r}")
                out[key] = (obj, f.name, hints[f.name])
            if dataclasses.is_dataclass(v):
                walk(v, "" if obj is cfg and f.name in FLAT else key + ".")
    walk(cfg, "")
    return out


def value(cfg, key, default=None):
    """The value of `key` (as keys() names it) in `cfg`, or `default` when the config has no such key."""
    slot = keys(cfg).get(key)
    return default if slot is None else getattr(slot[0], slot[1])


def _set(cfg, key, v, where, typed):
    """Set `key` to `v`, typed by `typed(key, v, type)`; a dict for a group sets the group's keys it names."""
    obj, name, ftype = keys(cfg)[key]
    if dataclasses.is_dataclass(getattr(obj, name)):
        if isinstance(v, str):  # the command line's --decoder="{'ch': 64}"
            try:
                v = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                pass
        if not isinstance(v, dict):
            raise UserError(f"{where}: {key} = {v!r}: expected a dict of {key}'s keys, e.g. {key}=dict(...)")
        sub = [f"{key}.{k}" for k in v]
        _check_keys(cfg, sub, where)
        for k, x in zip(sub, v.values()):
            _set(cfg, k, x, where, typed)
        return
    setattr(obj, name, typed(key, v, ftype))


def _check_keys(cfg, names, where, command=None):
    """A UserError for the keys `cfg` has no field for: one line naming each with the closest valid keys (a
    typo is usually a letter or an underscore away) and pointing to --help for the whole list. A DERIVED name
    says where its value comes from."""
    valid, derived = list(keys(cfg)), getattr(type(cfg), "DERIVED", {})
    unknown = [k for k in names if k not in valid]
    if not unknown:
        return
    named = []
    for k in unknown:
        close = _closest(k, valid)
        named.append(f"{k!r} (it comes from {derived[k]})" if k in derived else
                     f"{k!r} (did you mean {' or '.join(close)}?)" if close else f"{k!r} (no key is close)")
    raise UserError(f"unknown config key{'s' * (len(unknown) > 1)} {', '.join(named)} {where}; "
                    f"`{_prog(type(cfg), command)} --help` lists every key")


def _closest(k, valid):
    """Up to 3 keys close to `k`, the closest first; one far closer than the rest stands alone."""
    score = {v: difflib.SequenceMatcher(None, k, v).ratio() for v in valid}
    close = sorted(difflib.get_close_matches(k, valid, n=3, cutoff=0.6), key=lambda v: (-score[v], valid.index(v)))
    return [v for v in close if score[v] >= score[close[0]] - 0.15]


SECTIONS = ("siglip", "tokenizer", "mllm")  # the `<section>_config` dicts of a pipeline preset (config/shapes.py)


def preset_values(path, section=None):
    """The names a preset file assigns (its `<section>_config` dict merged in), as a dict. Dicts of the
    other SECTIONS are skipped; a `<x>_config` dict for an unknown x is a UserError (a misspelt section
    would otherwise be skipped too, and the script would train with its defaults)."""
    if not os.path.isfile(path):
        raise UserError(f"preset file {path!r} does not exist")
    scope = {}
    try:  # a preset is the user's Python: its mistake is one line naming the file and line
        with open(path, encoding="utf-8") as f:
            code = compile(f.read(), path, "exec")
        exec(code, scope)
    except SyntaxError as e:
        raise UserError(f"preset {path}:{e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"preset {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except Exception as e:
        import traceback
        line = next((fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__)) if fr.filename == path), "?")
        raise UserError(f"preset {path}:{line}: {type(e).__name__}: {e}") from None
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


def apply_preset(cfg, path, command=None):
    """Run the preset file and copy the names it assigns onto `cfg` (a dataclass instance)."""
    _assign(cfg, [path], command)
    return cfg


def _assign(cfg, argv, command=None):
    """Apply presets (`*.py`) and `--key=value` overrides to `cfg` in order -> the keys they set."""
    done = []
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                key = arg.split("=", 1)[0].lstrip("-").replace("-", "_")
                hint = f"; did you mean --{arg.lstrip('-')}?" if "=" in arg and key in keys(cfg) else ""
                raise UserError(f"expected a preset file (*.py) or --key=value, got {arg!r}{hint} "
                                f"(`{_prog(type(cfg), command)} --help` lists the keys)")
            done += assign(cfg, preset_values(arg, getattr(cfg, "SECTION", None)), arg, command)
            continue
        if "=" not in arg:
            raise UserError(f"expected --key=value, got {arg!r} (`{_prog(type(cfg), command)} --help` lists the keys)")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        _check_keys(cfg, [key], "on the command line", command)
        _set(cfg, key, text, "on the command line", lambda k, t, ftype: _parse_value(k, t, ftype) if isinstance(
            t, str) else preset_value(k, t, ftype, "--" + k))
        done.append(key)
    return done


def make(cls, **values):
    """A config built in code as a preset builds it: `make(TrainMLLMConfig, n_layer=1, max_steps=5)`."""
    cfg = cls()
    assign(cfg, values, f"{cls.__name__}(...)")
    return cfg


def assign(cfg, values, where, command=None):
    """Set the keys of the dict `values` on `cfg` as a preset's are set (each checked against its field's type,
    a group's from a dict; `where` names the source in an error) -> the keys set."""
    _check_keys(cfg, values, f"in {where}", command)
    for k, v in values.items():
        _set(cfg, k, v, where, lambda key, x, ftype: preset_value(key, x, ftype, where))
    return list(values)


def parse_config(cfg, argv=None, command=None, commands=None):
    """Apply presets (`*.py` positional arguments) then `--key=value` overrides to `cfg`, in order. With
    `--help` or `-h` among them, print the help of `cfg` (the presets and overrides shown beside the
    defaults) and exit instead. A script of several commands names the one `cfg` belongs to (`command`, as
    typed after the script) and may pass its command table (`commands`, see `command`) for the help to list."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP_FLAGS for a in argv):
        defaults = copy.deepcopy(cfg)
        given = _assign(cfg, [a for a in argv if a not in HELP_FLAGS], command)
        _print_and_exit(config_help(defaults, cfg, given, argv, command, commands))
    _assign(cfg, argv, command)
    return cfg


def preset_value(name, value, ftype, where):
    """A preset's value for the field `name` of type `ftype`, checked as _parse_value checks the command line's
    text: Optional[T] takes None, an int may stand for a float, a tuple or list field takes either (as the
    field's kind). A value of another type is a UserError naming the preset, the key and the value."""
    origin = typing.get_origin(ftype) or (ftype if ftype in (tuple, list) else None)
    args = typing.get_args(ftype)
    if origin is typing.Union or (origin is not None and type(None) in args):  # Optional[T]
        return None if value is None else preset_value(name, value, [a for a in args if a is not type(None)][0], where)
    if origin in (tuple, list):
        ok, value = isinstance(value, (tuple, list)), origin(value) if isinstance(value, (tuple, list)) else value
    elif ftype is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif ftype in (bool, int, str):
        ok = isinstance(value, ftype) and (ftype is bool or not isinstance(value, bool))
    else:
        ok = True
    if not ok:
        kind = origin.__name__ if origin in (tuple, list) else getattr(ftype, "__name__", str(ftype))
        raise UserError(f"{where}: {name} = {value!r}: expected {kind}, got {type(value).__name__}")
    return value


def text_lines(path):
    """[(line number, line)] of a text file the user gives, decoded as UTF-8 line by line: a line that is not
    UTF-8 is a UserError naming file:line, not a decoder traceback."""
    with open(path, "rb") as f:
        raw = f.read().splitlines(keepends=True)
    out = []
    for n, b in enumerate(raw, 1):
        try:
            out.append((n, b.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{n} is not UTF-8 text (byte {b[e.start]:#04x} at column {e.start + 1}): save "
                            f"the file as UTF-8") from None
    return out


# -----------------------------------------------------------------------------
# --help: what a script does and every key it takes, read from the script's docstring and config classes

HELP_FLAGS = ("-h", "--help")


def _module(obj):
    """The module a class or function was defined in (the script's `__main__` when run as one)."""
    return sys.modules.get(obj.__module__)


def _prog(obj, command=None):
    """`python eval.py mllm`: how a user runs the script that defines `obj` (a config class or a function)."""
    mod = _module(obj)
    name = os.path.basename(getattr(mod, "__file__", None) or f"{obj.__module__}.py")
    return f"python {name}" + (f" {command}" if command else "")


def _print_and_exit(text):
    """Print a help text and exit 0; a reader that stops early (`--help | head`) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush must not fail
    sys.exit(0)


def _width():
    return max(80, min(shutil.get_terminal_size((120, 24)).columns, 120))


def _wrap(text, width, indent="", first=None):
    """Lines of at most `width` characters, never broken inside a word, a path or a key-name-with-hyphens."""
    return textwrap.wrap(text, width, initial_indent=indent if first is None else first, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False)


def _script_head(obj, command=None, commands=None, every=False):
    """The top of a script's help: the first paragraph of its docstring, a usage line, the docstring's command
    lines (`    python eval.py mllm ...`, with their `\\` continuations) that run `command` (None: the ones that
    name no command; `every`: all), then what `command` does (the first paragraph of its function's docstring)
    or, without one, every command with the first sentence of its docstring."""
    doc = textwrap.dedent(getattr(_module(obj), "__doc__", None) or "").strip("\n")
    script = _prog(obj).split()[-1]
    lines, keep = [], False  # keep: the line taken last ends in a backslash
    for ln in doc.splitlines():
        s, take = ln.strip(), keep
        if not keep and ln.startswith("    ") and s.startswith(("python ", "torchrun ")) and script in s:
            first = (s.split(script, 1)[1].split() or [""])[0]
            take = every or (first if first == command or first in (commands or ()) else None) == command
        if take:
            lines.append(ln)
        keep = take and s.endswith("\\")
    synopsis = "[config/preset.py ...] [--key=value ...]"
    if commands and command is None:
        names = "|".join(commands)
        synopsis = (f"{{{names}}} " if every else f"[{names}] ") + synopsis
    out = [doc.split("\n\n")[0], "", f"usage: {_prog(obj, command)} {synopsis}"] + lines
    about = {name: (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
             for name, fn in (commands or {}).items()}
    if command in about:  # one command's help: what it does
        out += [""] + _wrap(f"{command}: {about[command]}", _width())
    elif commands:  # the script's: every command, the first sentence of what it does
        out += ["", "commands:"]
        width = max(len(c) for c in commands) + 2
        for name, text in about.items():
            out += _wrap(text.split(". ")[0].rstrip("."), _width(), " " * (width + 2), f"  {name:<{width}}") or [
                f"  {name}"]
    return out


def command(argv, commands, optional=False):
    """The command of a script that runs several (`python eval.py mllm ...`): argv -> (name, the arguments
    after it). `commands` is {name: the function that runs it}; the first sentence of its docstring is its
    line in the help. `--help` / `-h` in the command's place lists the commands and exits. An `optional`
    command may be left out: when the first argument is no command (a preset, a key, a help flag) the name
    is None, the script runs its default job, and that job's help lists the commands beside its keys."""
    argv = list(argv)
    if argv and argv[0] in commands:
        return argv[0], argv[1:]
    if optional and (not argv or argv[0].startswith("-") or argv[0].endswith(".py")):
        return None, argv
    fn = next(iter(commands.values()))
    prog = _prog(fn)
    if argv and argv[0] in HELP_FLAGS:
        _print_and_exit("\n".join(_script_head(fn, None, commands, every=True) +
                                   ["", f"`{prog} COMMAND --help` lists the keys of one command."]))
    usage = f"usage: {prog} {{{'|'.join(commands)}}} [config/preset.py ...] [--key=value ...]"
    if not argv:
        raise UserError(f"{usage} (`{prog} --help` says what each command does)")
    close = difflib.get_close_matches(argv[0], list(commands), n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(f"unknown command {argv[0]!r}; {hint}{usage} (`{prog} --help` says more)")


def _type_name(t):
    """A field's type as a user reads it: int, Optional[float], tuple[int, ...]."""
    if t is type(None):
        return "None"
    if t is Ellipsis:
        return "..."
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        names = " | ".join(_type_name(a) for a in inner)
        return f"Optional[{names}]" if len(inner) < len(args) else names
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _class_layout(cls):
    """The body of a config class as --help shows it -> (its docstring, items in source order):
    ("field", name, [comment lines]) per annotated field, ("heading", [lines]) per comment block on lines of
    its own (it heads the fields below it), ("gap",) per blank line. A field's comment is its trailing
    `# ...` and the comment lines that continue it (indented further than a heading's `# `)."""
    try:
        src = textwrap.dedent("".join(inspect.getsourcelines(cls)[0]))
        node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef))
        comments = {t.start[0]: (t.start[1], t.string[1:]) for t in tokenize.generate_tokens(io.StringIO(src).readline)
                    if t.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, StopIteration, tokenize.TokenError):
        return None, []
    text, starts = src.splitlines(), {st.lineno: st for st in node.body}
    items, cont, row = [], None, node.lineno + 1  # cont: (the field whose comment may go on, its indent)
    while row <= node.end_lineno:
        st, s = starts.get(row), text[row - 1].strip()
        if st is not None:
            cont = None
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                said = [comments[r][1].strip() for r in range(st.lineno, st.end_lineno + 1) if r in comments]
                items.append(("field", st.target.id, said))
                cont = (items[-1], len(text[row - 1]) - len(text[row - 1].lstrip())) if said else None
            row = st.end_lineno + 1
            continue
        if not s:
            items.append(("gap",))
            cont = None
        elif row in comments:
            col, body = comments[row]
            if cont and (col > cont[1] or body.startswith("  ")):
                cont[0][2].append(body.strip())
            else:
                cont = None
                if items and items[-1][0] == "heading":
                    items[-1][1].append(body.strip())
                else:
                    items.append(("heading", [body.strip()]))
        row += 1
    return ast.get_docstring(node), items


def config_help(defaults, cfg, given, argv, command=None, commands=None):
    """The help text of a config: the script's head (`_script_head`), then every key grouped as its class
    groups them (the class that defines a field; comment headings and blank lines inside a class), each with
    its type, default, the value `argv`'s presets and overrides gave it (`given`: the keys they set) and the
    comment beside it. The classes of an inheritance chain come most derived first: a job's own keys before
    the ones it shares; then the model's config and its groups (`keys`)."""
    cls = type(cfg)
    slots = keys(cfg)
    names = [k for k, (obj, n, _) in slots.items() if not dataclasses.is_dataclass(getattr(obj, n))]
    classes = [c for c in cls.__mro__ if dataclasses.is_dataclass(c)]
    layouts = {c: _class_layout(c) for c in classes}
    meaning = {}
    for c in reversed(classes):  # a subclass that redefines a field without a comment keeps the base's
        for it in layouts[c][1]:
            if it[0] == "field" and it[2]:
                meaning[it[1]] = " ".join(it[2])
    groups, shown = [], set()  # [(class, items, the prefix of its keys, its title)]
    for c in classes:
        own = [n for n in c.__dict__.get("__annotations__", {}) if n in names and n not in shown]
        items = [it if it[0] != "field" or it[1] in own else ("field", None) for it in layouts[c][1]]
        items += [("field", n, []) for n in own if not any(it[0] == "field" and it[1] == n for it in items)]
        shown.update(own)
        if own:
            groups.append((c, items, "", c.__name__))
    nested = {}  # the model's config and its groups: (holder, prefix) in the order keys() meets them
    for k, (obj, n, _) in slots.items():
        if obj is not cfg and k in names:
            nested.setdefault(id(obj), (obj, k[:len(k) - len(n)]))
    for obj, prefix in nested.values():
        c = type(obj)
        layouts[c] = layouts.get(c) or _class_layout(c)
        items = [it if it[0] != "field" or prefix + it[1] in names else ("field", None) for it in layouts[c][1]]
        meaning.update({prefix + it[1]: " ".join(it[2]) for it in items if it[0] == "field" and it[1] and it[2]})
        groups.append((c, [("field", prefix + it[1], *it[2:]) if it[0] == "field" and it[1] else it for it in items],
                       prefix,
                       f"{prefix.rstrip('.')}: {c.__name__}" if prefix else c.__name__))
    set_keys = [k for k in names if k in given or k.split(".")[0] in given]  # a group's dict sets its keys
    given_text = " ".join(a for a in argv if a not in HELP_FLAGS)
    cols = ["key: type = default"] + (["set"] if set_keys else [])
    rows = {n: [f"{n}: {_type_name(slots[n][2])} = {value(defaults, n)!r}"] +
            ([repr(value(cfg, n)) if n in set_keys else ""] if set_keys else []) for n in names}
    caps = [42, 16]  # a longer cell puts the meaning on the next line
    widths = [min(max([len(cols[i])] + [len(r[i]) for r in rows.values()]), caps[i]) for i in range(len(cols))]
    mcol = 2 + sum(w + 2 for w in widths)
    W = _width()

    def row_lines(cells, about):
        left = "  " + "".join(f"{c:<{w}}  " for c, w in zip(cells, widths)).rstrip()
        if len(left) > mcol - 2 and about:
            return [left] + _wrap(about, W, " " * mcol)
        wrapped = _wrap(about, max(W - mcol, 30)) or [""]
        return [f"{left:<{mcol}}{wrapped[0]}".rstrip()] + [" " * mcol + w for w in wrapped[1:]]

    section = getattr(cls, "SECTION", None)
    out = _script_head(cls, command, commands) + [""]
    out += _wrap(f"keys: --key=value on the command line, or `key = value` in a preset file"
                 + (f" (or in its `{section}_config = dict(...)` section)" if section else "")
                 + "; a value is a Python literal of the type shown, and an unknown key is an error."
                 + (" A key of a group (decoder.ch) is set by its dotted name, or in a dict for the group "
                    "(decoder=dict(ch=64))." if any("." in n for n in names) else "")
                 + (f" set: what `{given_text}` gives." if set_keys else ""), W)
    out += [""] + row_lines(cols, "meaning")
    for c, items, prefix, title in groups:
        doc = layouts[c][0]
        if len(groups) > 1:
            out += ["", f"{title} ({_prog(c).split()[-1]})" + (f": {doc.splitlines()[0]}" if doc else "")]
        pending, first = [], True  # the headings and gaps above the next field
        for it in items:
            if it[0] != "field":
                pending.append(it)
                continue
            if it[1] not in rows:  # no key (the model's group, a DERIVED field): nor its heading, but a class's first
                pending = pending if first else []
                continue
            heads = [ln for p in pending if p[0] == "heading" for ln in p[1] if ln]
            if pending and not first and out[-1]:
                out.append("")
            out += ["  # " + ln for ln in heads]
            out += row_lines(rows[it[1]], meaning.get(it[1], ""))
            pending, first = [], False
    return "\n".join(out)


def positional_help(argv, module, usage):
    """--help / -h for a script that takes positional arguments instead of keys (data.py, convert.py): print
    the first paragraph of its docstring and `usage` ({one form of its command line: what it does}), then exit.
    Without a help flag in argv it returns at once."""
    if not any(a in HELP_FLAGS for a in argv):
        return
    mod = sys.modules[module]
    prog, W = f"python {os.path.basename(mod.__file__)}", _width()
    out = [textwrap.dedent(mod.__doc__ or "").strip("\n").split("\n\n")[0], "", "usage:"]
    for form, about in usage.items():
        out += [f"  {prog} {form}"] + _wrap(about, W, " " * 6)
    _print_and_exit("\n".join(out))


def read_lines(path, what):
    """A list argument given as a file (class names, templates, captions) -> its non-empty lines, stripped;
    a missing or empty file is a UserError naming `what`."""
    if not os.path.isfile(path):
        raise UserError(f"{what} file {path!r} does not exist")
    lines = [ln.strip() for _, ln in text_lines(path) if ln.strip()]
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
    for n, line in text_lines(path):
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
    """Plain dict of a config, for JSON logs and checkpoints: its keys as the command line names them (the model
    config's beside the trainer's, as a preset writes them), a group (decoder) as a dict of its keys."""
    derived, out = getattr(type(cfg), "DERIVED", {}), {}
    for k, (obj, name, _) in keys(cfg).items():
        v = getattr(obj, name)
        if "." not in k:
            out[k] = ({f: x for f, x in dataclasses.asdict(v).items() if f"{k}.{f}" not in derived}
                      if dataclasses.is_dataclass(v) else copy.deepcopy(v))
    return out
