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
no traceback (`--debug=True` or NANO_DEBUG=1 shows it). Ctrl-C is one line too (the step reached and the
last checkpoint, from PROGRESS), exit 130. Anything else is a bug and raises as usual.

What a command writes goes through here as well: check_outputs (an output never lands on an input or on a
model's files), hold_folder (one writer per folder, an OS lock the kernel drops when the process dies) and
atomic_write (a file is replaced whole or not at all).
"""
import ast
import contextlib
import dataclasses
import json
import os
import re
import sys
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


def apply_preset(cfg, path):
    """Run the preset file and copy the names it assigns onto `cfg` (a dataclass instance), each checked against
    its field's type as `--key=value` is (preset_value)."""
    values = preset_values(path, getattr(cfg, "SECTION", None))
    _check_keys(cfg, values, path)
    hints = typing.get_type_hints(type(cfg))
    for k, v in values.items():
        setattr(cfg, k, preset_value(k, v, hints[k], path))
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
    """Plain dict of a config, for JSON logs and checkpoints."""
    return dataclasses.asdict(cfg)


# -----------------------------------------------------------------------------
# outputs: never on an input or on a model's files; one writer per folder

# A folder holding one of these is a model folder (ours, the authors' release, a Hugging Face one); a file of it
# with one of these names or endings is a model file, which no command's output may replace.
MODEL_MARKERS = ("config.json", "model.safetensors", "train_state.pt", "model.pt")
MODEL_FILE_ENDINGS = (".safetensors", ".pt", ".pth", ".bin", ".model", "config.json", "tokenizer.json")


def is_model_folder(path):
    return os.path.isdir(path) and (any(os.path.isfile(os.path.join(path, f)) for f in MODEL_MARKERS)
                                    or any(f.endswith(".safetensors") for f in os.listdir(path)))


def model_kind(conf):
    """What a model folder's config.json (a dict) describes, in words: a loader given a folder of another kind
    says what it got, not that a key is missing."""
    if not isinstance(conf, dict):
        return "a config.json that is not a JSON object"
    if conf.get("format") == "nano-dualtoken":
        return "a DualToken tokenizer folder (train_tokenizer.py's out_dir)"
    if "rqvaesiglip" in conf:
        return "the authors' DualToken release"
    if "mllm" in conf:
        return "an MLLM folder (train_mllm.py's out_dir)"
    mt = conf.get("model_type")
    if mt in ("siglip", "siglip_vision_model"):
        return "a SigLIP folder (train_siglip.py's out_dir, or Hugging Face's)"
    return f"a Hugging Face {mt!r} model folder" if mt else "a folder whose config.json names no model kind"


def _inside(path, folder):
    """True when the resolved `path` is `folder` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def path_fields(cfg, skip=()):
    """(--key, value) of every string field of a config naming an existing file or folder: what the command
    reads (check_outputs' `reads`), found from the values themselves, so a new path key is covered too."""
    return [(f"--{k}", v) for k, v in config_dict(cfg).items()
            if k not in skip and isinstance(v, str) and v and os.path.exists(v)]


def check_outputs(reads=(), dirs=(), files=()):
    """Refuse, before any work, an output that would land on what the command reads or on a model.
    reads, dirs, files: (name as the user wrote it, path) pairs; empty paths are skipped. Paths are compared
    resolved (symlinks, '..'). A folder output (an out_dir) must not be a file, nor be or lie inside a folder
    the command reads (a trainer writing into its teacher replaces it). A file output (an evaluation's --out)
    must not be a folder, an input itself, or a model file (MODEL_FILE_ENDINGS) of a model folder; a result
    file beside a model is fine, it is what the evaluations write by default (<mllm>/eval_mllm.json). This
    holds with --overwrite=True too: overwrite replaces an earlier result of the same command, never an input."""
    reads = [(n, p, os.path.realpath(p)) for n, p in reads if p]
    for name, p in dirs:
        if not p:
            continue
        if os.path.exists(p) and not os.path.isdir(p):
            raise UserError(f"{name}={p!r} is a file: need a folder to write into")
        rp = os.path.realpath(p)
        for rname, r, rr in reads:
            if rp == rr:
                raise UserError(f"{name}={p!r} is {rname}, which this command reads: write into another folder")
            if os.path.isdir(rr) and _inside(rp, rr):
                raise UserError(f"{name}={p!r} is inside {rname}={r!r}, which this command reads: write into a "
                                f"folder outside it")
    for name, p in files:
        if not p:
            continue
        if os.path.isdir(p):
            raise UserError(f"{name}={p!r} is a folder: need a file path (e.g. {os.path.join(p, 'result.json')})")
        rp = os.path.realpath(p)
        for rname, r, rr in reads:
            if rp == rr:
                raise UserError(f"{name}={p!r} is {rname}, which this command reads: write to another file")
        folder = os.path.dirname(rp)
        if os.path.basename(rp).endswith(MODEL_FILE_ENDINGS) and is_model_folder(folder):
            beside = os.path.join(os.path.dirname(p), "result.json")
            raise UserError(f"{name}={p!r} would replace a file of the model in {folder}: write to another file "
                            f"(a result beside the model is fine, e.g. {beside})")


def probe_writable(folder, hint):
    """Refuse now, not after the work, a folder an output goes to that cannot be written (a file in the way, no
    permission, a read-only mount). The folder is made if missing; a probe file is written and removed."""
    import tempfile
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write into {folder!r} ({e.strerror or type(e).__name__}): {hint}") from None


LOCK_FILE = ".writer.lock"
_HELD = {}  # resolved folder -> [open lock file, depth]: a process re-entering a folder it holds (ablation.py)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder):
    """Temporary files a killed save left (atomic_write's `.<name>.tmp<pid>` of a process that is gone, a
    sharded save's `<state>.shards.<step>.tmp` folder): call it holding the folder, so no live writer of ours
    owns them. A temporary of a live process (an evaluation writing its result beside a model) is kept."""
    import shutil
    for d, subdirs, names in os.walk(folder):
        for n in names:
            m = re.fullmatch(r"\..+\.tmp(\d+)", n)
            if m and not _alive(int(m.group(1))):
                os.remove(os.path.join(d, n))
        for n in list(subdirs):
            if re.fullmatch(r".+\.shards\.\d+\.tmp", n):
                shutil.rmtree(os.path.join(d, n))
                subdirs.remove(n)


@contextlib.contextmanager
def hold_folder(folder):
    """One writer per folder: an exclusive flock on `folder`/.writer.lock for the life of the block, created with
    the folder if needed. The kernel drops the lock when the process dies, so a crash or a kill never leaves a
    stale one; a second process is refused with one line naming the folder and the holder's pid and command.
    The folder is probed for writing on the way (a read-only folder is refused before any work), and the
    temporaries of an earlier killed save are removed. Re-entrant within a process (ablation.py trains in
    process); under torchrun only global rank 0, the one that writes, takes it. On release the lock file is
    removed, and the folder too if the block created it and left it empty (a refused command leaves nothing)."""
    import fcntl
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder!r} is a file: need a folder to write into")
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    created = not os.path.exists(folder)
    path = os.path.join(folder, LOCK_FILE)
    try:
        os.makedirs(folder, exist_ok=True)
        while True:
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "a process that has not written its pid yet"
                f.close()
                raise UserError(f"{folder} is being written by another process ({holder[:160]}): one writer per "
                                f"folder; wait for it to finish, stop it, or choose another folder") from None
            # the holder before us may have removed the file after we opened it: then ours is an orphan
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}\n")
        f.flush()
    except OSError as e:
        if created and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
        raise UserError(f"cannot write into {folder!r} ({e.strerror or type(e).__name__}): need a folder this user "
                        f"may write") from None
    _HELD[key] = [f, 1]
    try:
        remove_stale_temporaries(folder)
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # before the unlock: a process that opened it meanwhile then sees it is an orphan
        f.close()
        if created and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
