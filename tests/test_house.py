"""The house (README, "Files"): components at the bottom, scripts on top.

A script imports components only, never another script (ablation.py driving train_tokenizer is the one
orchestration edge allowed); a component never imports a script; and no import circle anywhere. Read
from the source with `ast`, so an import inside a function (a lazy import) counts like one at the top.
"""
import ast
import os

from conftest import ROOT

SCRIPTS = {"train_siglip", "train_tokenizer", "train_mllm", "sample", "eval", "ablation", "bench"}
ALLOWED = {("ablation", "train_tokenizer")}  # ablation.py runs train_tokenizer's trainer once per variant


def _modules():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def _graph():
    """{module: {(imported project module, line)}} for every top-level .py, imports at any depth."""
    mods = set(_modules())
    graph = {}
    for m in mods:
        with open(os.path.join(ROOT, m + ".py")) as f:
            tree = ast.parse(f.read(), m + ".py")
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            edges.update((n, node.lineno) for n in names if n in mods and n != m)
        graph[m] = edges
    return graph


def test_every_script_is_a_top_level_file():
    assert SCRIPTS <= set(_modules())


def test_no_script_imports_a_script():
    bad = [f"{m}.py:{line} imports {n}" for m, edges in _graph().items() if m in SCRIPTS
           for n, line in sorted(edges, key=lambda e: e[1]) if n in SCRIPTS and (m, n) not in ALLOWED]
    assert not bad, "scripts import only components:\n" + "\n".join(bad)


def test_no_component_imports_a_script():
    bad = [f"{m}.py:{line} imports {n}" for m, edges in _graph().items() if m not in SCRIPTS
           for n, line in sorted(edges, key=lambda e: e[1]) if n in SCRIPTS]
    assert not bad, "components sit below the scripts:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {n for n, _ in edges} for m, edges in _graph().items()}
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


MAX_LINES = 700  # no file over 700 lines (aim for 600 where a component allows)


def test_no_file_over_700_lines():
    long = []
    for m in _modules():
        with open(os.path.join(ROOT, m + ".py")) as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long.append(f"{m}.py: {n} lines")
    assert not long, f"files over {MAX_LINES} lines (split them along a seam):\n" + "\n".join(long)


# Names every script or model file may define for itself: the per-script skeleton of nanoGPT's train.py
# (main, train, validate, evaluate, build_model, make_data, set_trainable: each script's own loop over its
# own model and data), each component's test-sized config (tiny_config), and each transformer's own blocks
# (SigLIP's LayerNorm/GELU/bias blocks and the LLM's RMSNorm/SwiGLU/RoPE ones are different modules).
PER_FILE = {"main", "train", "validate", "evaluate", "build_model", "make_data", "set_trainable", "tiny_config",
            "Attention", "MLP", "Block"}


def test_one_home_per_name():
    """One home per idea: a top-level function or class name defined in two top-level files is
    either a copied helper (import it from its home instead) or two ideas under one name (rename one)."""
    homes = {}
    for m in _modules():
        with open(os.path.join(ROOT, m + ".py")) as f:
            tree = ast.parse(f.read(), m + ".py")
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name not in PER_FILE:
                homes.setdefault(node.name, []).append(f"{m}.py:{node.lineno}")
    twice = [f"{name}: {', '.join(where)}" for name, where in sorted(homes.items()) if len(where) > 1]
    assert not twice, "one home per name (import the helper, or rename one of two ideas):\n" + "\n".join(twice)


# What writes a file or a folder a user keeps (the project's writers and the os calls behind them), and what guards a
# command that does: folders.check_outputs (an output never lands on an input or a model's files) and
# folders.hold_folder (one writer per folder); train_utils.holds does both around a trainer.
WRITERS = {"write_json", "atomic_write", "atomic_save", "save_train_state", "save_safetensors",
           "atomic_save_safetensors", "save_png", "grid_png", "save_pretrained", "export", "JsonlLogger", "makedirs",
           "prepare_cache", "save_sharded", "save_file", "replace", "rmtree"}
CHECKS, LOCKS = {"check_outputs", "check_result_file", "holds"}, {"hold_folder", "holds"}
NO_LOCK = {"eval": "writes one result file (--out), by an atomic replace, often beside a model that another run trains"}
NO_CHECK = {"data": "`data.py export DIR` reads nothing an output could land on (hold_folder refuses a file as DIR)"}
NO_WRITE = {"bench": "writes only into tempfile folders it makes and removes"}


def _names(tree):
    """Every called or referenced name and attribute in a module."""
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def test_every_command_that_writes_checks_its_outputs_and_holds_its_folder():
    """Each command (a file that runs under configurator.run_main) that calls a writer goes through the output check
    and the folder lock, or is named above with the reason it does not need one."""
    bad = []
    for m in _modules():
        if m == "configurator":
            continue
        with open(os.path.join(ROOT, m + ".py")) as f:
            tree = ast.parse(f.read(), m + ".py")
        names = _names(tree)
        if "run_main" not in names or m in NO_WRITE:
            continue
        calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
                 for n in ast.walk(tree) if isinstance(n, ast.Call)}
        if not calls & WRITERS:
            continue
        if not names & CHECKS and m not in NO_CHECK:
            bad.append(f"{m}.py writes ({sorted(calls & WRITERS)}) without folders.check_outputs")
        if not names & LOCKS and m not in NO_LOCK:
            bad.append(f"{m}.py writes ({sorted(calls & WRITERS)}) without folders.hold_folder")
    assert not bad, "\n".join(bad)


def _project_text_files():
    import subprocess
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if f.endswith((".py", ".md", ".sh", ".txt", ".ini")) or f.startswith(".ci/")]


def test_the_project_stands_alone():
    """No reference a reader cannot open: no path outside the repository, no tracker number, no external spec;
    every "design §N" cited names a section that docs/design.md has."""
    import re
    with open(os.path.join(ROOT, "docs", "design.md")) as f:
        sections = {int(m) for m in re.findall(r"^## (\d+)\.", f.read(), re.M)}
    forbidden = re.compile("(?i)" + "|".join([r"\bissues? ?#?\d+", "spec" + " section", *("/" + d + "/" for d in
                                                                                      ("work", "home", "Users"))]))
    bad, cited = [], set()
    for name in _project_text_files():
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if forbidden.search(line):
                    bad.append(f"{name}:{n}: {line.strip()[:80]}")
                for a, b in re.findall(r"design §(\d+)(?:-§(\d+))?", line):
                    cited.update(range(int(a), int(b or a) + 1))
    assert not bad, bad
    assert cited and cited <= sections, sorted(cited - sections)
