"""The import graph, read from the source with `ast` (nothing is imported): the package's layers import one
way, rewards <- math <- engine <- methods <- training <- config <- builder <- commands, strategies stay
independent of each other, only the one loop steps the chain, and there is no import cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffusion_align"
STRATEGY_DIR = PACKAGE / "methods" / "strategies"
SHARED_HELPER = "diffusion_align.methods.strategies.sampling"  # the one module every strategy may use
# Each module's layer: a module may import its own layer and the ones below it, never one above.
LAYERS = (
    "rewards",
    "diffusion_align.math",
    "diffusion_align.engine",
    "diffusion_align.methods",
    "diffusion_align.training",
    "diffusion_align.config",
    "diffusion_align.builder",
    ("diffusion_align.commands", "diffusion_align.cli", "diffusion_align.__main__", "diffusion_align.zoo"),
)
# Support modules any layer may use; they import only each other and rewards.
SUPPORT = (
    "diffusion_align",
    "diffusion_align.errors",
    "diffusion_align.images",
    "diffusion_align.videos",
    "diffusion_align.prompts",
    "diffusion_align.bundled",
    "diffusion_align.testing",
    "diffusion_align.testing_video",
    "diffusion_align.testing_flow",
)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports too); `from m import x` counts as
    m and m.x (x may be a submodule). Relative imports are resolved against the file's package."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def reaches(imports: set[str], target: str) -> bool:
    return any(m == target or m.startswith(target + ".") for m in imports)


def strategy_modules() -> list[Path]:
    return [p for p in sorted(STRATEGY_DIR.glob("*.py")) if p.name != "__init__.py"]


def test_the_reader_sees_every_kind_of_import(tmp_path):
    """The checker itself: absolute, from-, relative and function-level imports are all found."""
    pkg = tmp_path / "diffusion_align" / "methods" / "strategies"
    pkg.mkdir(parents=True)
    source = pkg / "x.py"
    source.write_text(
        "import diffusion_align.training.trainer\nfrom . import ddpo\nfrom .d3po import D3PO\n"
        "def f():\n    from diffusion_align.methods.strategies.prdp import PRDP\n"
    )
    found = imported_modules(source, root=tmp_path)
    for name in (
        "diffusion_align.training.trainer",
        "diffusion_align.methods.strategies.ddpo",
        "diffusion_align.methods.strategies.d3po",
    ):
        assert name in found
    assert reaches(found, "diffusion_align.methods.strategies.prdp")


@pytest.mark.parametrize("path", strategy_modules(), ids=lambda p: p.stem)
def test_no_strategy_imports_another_strategy(path):
    others = {module_name(p) for p in strategy_modules()} - {module_name(path), SHARED_HELPER}
    bad = sorted(o for o in others if reaches(imported_modules(path), o))
    assert not bad, (
        f"{module_name(path)} imports strategy module(s) {bad}; shared code goes in {SHARED_HELPER}"
    )


def test_the_shared_helper_imports_no_strategy():
    own = {module_name(p) for p in strategy_modules()} - {SHARED_HELPER}
    path = STRATEGY_DIR / "sampling.py"
    assert not sorted(o for o in own if reaches(imported_modules(path), o))


def test_rewards_import_nothing_from_the_toolkit():
    bad = {
        str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if reaches({m}, "diffusion_align"))
        for p in sorted((ROOT / "rewards").rglob("*.py"))
    }
    assert not {k: v for k, v in bad.items() if v}


def test_math_imports_only_errors_from_the_toolkit():
    for path in sorted((PACKAGE / "math").glob("*.py")):
        bad = [m for m in imported_modules(path) if reaches({m}, "diffusion_align")]
        allowed = ("diffusion_align.errors", "diffusion_align.math")
        assert all(any(reaches({m}, a) for a in allowed) for m in bad), (path.name, bad)


def layer_of(module: str) -> int | None:
    """The index of `module`'s layer in LAYERS, -1 for a support module, None when it has none."""
    if module in SUPPORT:
        return -1
    for index, layer in enumerate(LAYERS):
        if any(reaches({module}, name) for name in (layer if isinstance(layer, tuple) else (layer,))):
            return index
    return None


def test_every_module_has_a_layer():
    graph = import_graph()
    assert not [m for m in graph if layer_of(m) is None], "assign new modules to LAYERS or SUPPORT"


def test_imports_run_down_the_layers():
    """rewards <- math <- engine <- methods <- training <- config <- builder <- commands: a module never
    imports one of a higher layer; support modules import only support modules and rewards."""
    bad = []
    for module, targets in import_graph().items():
        own = layer_of(module)
        for target in targets:
            layer = layer_of(target)
            if (own == -1 and layer not in (-1, 0)) or (own != -1 and layer > own):
                bad.append(f"{module} -> {target}")
    assert not bad, f"imports against the layer order: {bad}"


# Build-only code of the bundled models: the recipe that trains them, their eval, card, model builders and
# data generator. Only `diffusion-align zoo build|eval` (commands/zoo.py) and the zoo package itself import
# it; the runtime knows a bundled model's name, folder and prompt lists through `diffusion_align.bundled`.
BUILD_ONLY_PACKAGE = "diffusion_align.zoo"
BUILD_ONLY_MODULES = (
    "shapes_recipe", "shapes_flow_recipe", "shapes_eval", "shapes_card", "shapes_models", "shapes_data",
)  # fmt: skip
BUILD_ONLY_USERS = (PACKAGE / "commands" / "zoo.py",)


def test_build_only_list_names_every_zoo_module():
    found = {p.stem for p in (PACKAGE / "zoo").glob("*.py")} - {"__init__"}
    assert found == set(BUILD_ONLY_MODULES), "a new zoo module is build-only: add it to BUILD_ONLY_MODULES"


def test_only_the_zoo_command_imports_build_only_code():
    runtime = [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if (PACKAGE / "zoo") not in p.parents and p not in BUILD_ONLY_USERS
    ]
    bad = {
        str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if reaches({m}, BUILD_ONLY_PACKAGE))
        for p in runtime
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"runtime modules import build-only zoo code (use diffusion_align.bundled): {bad}"


def import_graph(root: Path = ROOT, packages=("diffusion_align", "rewards")) -> dict[str, set[str]]:
    """module -> the package modules it imports (module- and function-level), read with ast."""
    paths = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    return {name: imported_modules(path, root) & set(paths) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None: depth-first search, a back edge to a module on the
    current path closes a cycle."""
    done, path, on_path = set(), [], set()

    def visit(node):
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph[node]):
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "diffusion_align"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from diffusion_align import b\n")
    (pkg / "b.py").write_text("def f():\n    from diffusion_align.c import x\n")
    (pkg / "c.py").write_text("import diffusion_align.a\n")
    graph = import_graph(tmp_path, packages=("diffusion_align",))
    assert find_cycle(graph) == [
        "diffusion_align.a",
        "diffusion_align.b",
        "diffusion_align.c",
        "diffusion_align.a",
    ]
    (pkg / "c.py").write_text("x = 1\n")
    assert find_cycle(import_graph(tmp_path, packages=("diffusion_align",))) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}; imports must run one way"


# what the training loop must not reach: the builder hands it ready objects and plain values
CONFIG_MODULES = (
    "diffusion_align.config.loading",
    "diffusion_align.config.settings",
    "diffusion_align.config.registry",
    "diffusion_align.builder",
    "diffusion_align.config.changes",
    "diffusion_align.config.run_folder",
)


def package_closure(path: Path) -> dict[str, set[str]]:
    """{module: its imports} for `path` and every toolkit module it reaches, import after import."""
    seen: dict[str, set[str]] = {}
    todo = [path]
    while todo:
        current = todo.pop()
        name = module_name(current)
        if name in seen:
            continue
        seen[name] = imported_modules(current)
        for m in seen[name]:
            parts = m.split(".")
            for candidate in (
                ROOT.joinpath(*parts).with_suffix(".py"),
                ROOT.joinpath(*parts) / "__init__.py",
            ):
                if m.startswith("diffusion_align.") and candidate.is_file():
                    todo.append(candidate)
    return seen


def test_the_training_loop_imports_no_config_module():
    """training/trainer.py, and every toolkit module it imports on the way, work on objects and plain values:
    reading a config is the builder's job (`builder.build_run`)."""
    closure = package_closure(PACKAGE / "training" / "trainer.py")
    bad = {name: [t for t in CONFIG_MODULES if reaches(imports, t)] for name, imports in closure.items()}
    bad = {name: targets for name, targets in bad.items() if targets}
    assert not bad, f"the training loop reaches config modules: {bad}"


def attribute_calls(path: Path, attr: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
    ]


def test_only_the_one_loop_steps_the_chain():
    """`rollout` is the only caller of a sampler's step (`.step(out, t, x, ...)`, 3+ arguments, unlike an
    optimizer's or LR schedule's `.step()`); the denoiser's guided prediction is called only by rollout
    and by the policy's single-transition re-scoring."""
    steppers = {"engine/rollout.py", "math/scheduler_sampler.py"}  # the adapter calls diffusers' step
    predictors = {"engine/rollout.py", "engine/policy.py"}
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE))
        if name not in steppers and any(len(c.args) >= 3 for c in attribute_calls(path, "step")):
            bad.append(f"{name} calls a sampler step")
        if name not in predictors and attribute_calls(path, "predict"):
            bad.append(f"{name} calls predict")
    assert not bad, f"denoising outside rollout.py: {bad}"
