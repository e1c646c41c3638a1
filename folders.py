"""
What a command may write, and where: the rules that keep a user's own hand or a second process from costing a
model. An output never lands on what the command reads or on a model's files (check_outputs, before any work,
with --overwrite=True or without); a folder has one writer at a time (hold_folder: an OS lock the kernel drops
when the process dies, so a crash never leaves a stale one); a folder an output goes to is probed for writing up
front (probe_writable); a folder holding another kind of model is named as what it is (model_kind). The files
themselves are written by configurator.atomic_write (whole or not at all).
"""
import contextlib
import os
import re
import sys

from configurator import UserError, config_dict

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


def check_result_file(cfg, key, home):
    """An evaluation's result file cfg.<key>: one the user names must not replace an input or a model
    (check_outputs), and its folder, or `home` (the model's folder, where the default goes), is probed for
    writing before any work."""
    out = getattr(cfg, key)
    check_outputs(path_fields(cfg, skip=(key,)), files=[(f"--{key}", out)])
    if out:
        probe_writable(os.path.dirname(os.path.abspath(out)), f"give --{key}=FILE somewhere this user may write")
    elif home and os.path.isdir(home):
        probe_writable(home, f"give --{key}=FILE elsewhere")


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
