"""How mmkit is built, checked: layers import one way, methods and formats come from tables,
and a new method or format is one module plus one registration."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bottom to top: a package may import the ones before it, never the ones after
LAYERS = ("core", "adapters", "compression", "search", "cli")


def _imports(names: bool = False) -> list[tuple]:
    """(file, its package, the mmkit package it imports[, the names imported]) for every
    import between packages."""
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in LAYERS:
            continue
        package = list(rel.with_suffix("").parts)
        package = package[:-1]  # the package the module sits in (for relative imports)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                target = package[:len(package) - node.level + 1] + (node.module or "").split(".")
            elif (node.module or "").startswith("mmkit."):
                target = node.module.split(".")[1:]
            else:
                continue
            target = [t for t in target if t]
            if target and target[0] in LAYERS and target[0] != rel.parts[0]:
                found.append((str(rel), rel.parts[0], target[0],
                              *([[a.name for a in node.names]] if names else [])))
    return found


def test_packages_import_only_the_layers_below_them():
    upward = [f"{file} imports {target}" for file, package, target in _imports()
              if LAYERS.index(target) > LAYERS.index(package)]
    assert not upward, "imports running back up the layers:\n" + "\n".join(upward)


def test_no_import_cycle_between_packages():
    edges = {}
    for _, package, target in _imports():
        edges.setdefault(package, set()).add(target)

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
                   for n in edges.get(start, ()))

    cycles = [p for p in edges if reaches(p, p)]
    assert not cycles, f"packages in an import cycle: {cycles} ({edges})"


def test_the_import_walk_sees_imports():
    # the checks above pass vacuously if the walk finds nothing: it must see cli -> core
    assert ("cli", "core") in {(p, t) for _, p, t in _imports()}


def test_no_private_name_is_imported_across_packages():
    crossing = [f"{file}: {name} from {target}" for file, _, target, imported in _imports(True)
                for name in imported if name.startswith("_") and not name.startswith("__")]
    assert not crossing, "private names used from another package:\n" + "\n".join(crossing)


def test_every_format_round_trips_through_the_table():
    from mmkit.core.formats import all_formats

    names = [f.name for f in all_formats()]
    assert names[-1] == "hf-model"  # the fallback is tried last
    assert {"peft-adapter", "mmkit-adapter", "mmkit-quantized", "mmkit-ptq",
            "mmkit-pruned"} <= set(names)


def test_a_new_format_is_one_registration(tmp_path, monkeypatch):
    """A format registered from outside mmkit is detected, loaded and saved again by the
    ordinary load / write path."""
    import torch
    from safetensors.torch import load_file, save_file

    from mmkit.core import formats
    from mmkit.core.artifacts import write_artifact
    from mmkit.core.loading import load_model

    calls = []

    def load(cls, source, config, opts):
        calls.append("load")
        model = cls.from_config(config)
        model.load_state_dict(load_file(str(Path(source.path, "weights.safetensors"))))
        return model, {}

    def save(loaded, folder):
        calls.append("save")
        loaded.model.config.architectures = [type(loaded.model).__name__]
        loaded.model.config.save_pretrained(folder)
        state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
        save_file(state, str(folder / "weights.safetensors"))
        (folder / "test-format.json").write_text("{}")

    fmt = formats.Format("test-format", lambda f: (f / "test-format.json").is_file(), load, save)
    monkeypatch.setitem(formats._FORMATS, fmt.name, fmt)
    loaded = load_model("tiny:bert", labels=["a", "b"])
    loaded.extra["format"] = "test-format"
    out = write_artifact(loaded, tmp_path / "m", recipe={}, steps=[], metrics=[],
                         fmt="test-format")
    again = load_model(str(out))
    assert calls == ["save", "load"] and again.extra["format"] == "test-format"
    ids = torch.tensor([[2, 5, 7, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, again.model(input_ids=ids).logits)


def test_a_new_quantizer_is_one_module_and_one_registration(tmp_path, monkeypatch):
    """A throw-away method registered from this test file alone runs through a recipe, the
    command line (its name is a --method choice) and the artifact writer: adding a quantizer
    touches its own module and one register() call, nothing else."""
    import torch
    from click.testing import CliRunner
    from pydantic import Field

    from mmkit.cli.main import cli
    from mmkit.core import registry
    from mmkit.core.loading import load_model

    class HalfConfig(registry.MethodConfig):
        bits: int = Field(16, description="always 16: weights rounded to float16")
        skip: list[str] = Field(default_factory=list)

    def half_(loaded, cfg, ctx):
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.half().float()
        ctx.report.update({"method": "test-half", "layers_quantized": 1})
        return loaded

    method = registry.Method("quantize", "test-half", HalfConfig, half_, "float16 rounding")
    monkeypatch.setitem(registry._REGISTRY, ("quantize", "test-half"), method)
    result = CliRunner().invoke(cli, ["quantize", "tiny:bert", "--bits", "16", "--method",
                                      "test-half", "--max-samples", "8", "-o",
                                      str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    manifest = (tmp_path / "q" / "mmkit.json").read_text()
    assert '"method": "test-half"' in manifest
    loaded = load_model(str(tmp_path / "q"))
    w = loaded.model.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(w, w.half().float())


def test_a_recipe_step_and_the_command_pick_the_same_quantizer(tmp_path):
    """`mmkit quantize --bits 8` and a recipe's `{step: quantize, bits: 8}` both go through
    quantize auto, so a BERT on CPU gets dynamic-int8 either way (and a causal LM rtn)."""
    import json

    from click.testing import CliRunner

    from mmkit.cli.main import cli
    from mmkit.core.recipe import run_recipe

    for ref, expected in (("tiny:bert", "dynamic-int8"), ("tiny:llama", "rtn")):
        command = CliRunner().invoke(cli, ["quantize", ref, "--bits", "8", "--max-samples",
                                           "8", "-o", str(tmp_path / f"cli-{expected}")])
        assert command.exit_code == 0, command.output
        recipe = run_recipe({"model": ref, "max_samples": 8,
                             "steps": [{"step": "quantize", "bits": 8}]},
                            tmp_path / f"recipe-{expected}")
        by_command = json.loads((tmp_path / f"cli-{expected}" / "mmkit.json").read_text())
        assert recipe["steps"][0]["method"] == by_command["steps"][0]["method"] == expected


def test_steps_name_further_models_and_they_are_checked_before_loading(tmp_path, monkeypatch):
    """A step's parameters may name other models (a teacher, models to merge): a wrong one
    fails before the recipe's model loads, naming the step and the key; a right one reaches
    the method resolved."""
    from mmkit.core import registry
    from mmkit.core.errors import InputError
    from mmkit.core.recipe import run_recipe

    class TeacherConfig(registry.MethodConfig):
        teacher: str

    seen = {}

    def distil_(loaded, cfg, ctx):
        seen.update(ctx.models)
        return loaded

    method = registry.Method("cast", "test-teacher", TeacherConfig, distil_, "test",
                             models=("teacher",))
    monkeypatch.setitem(registry._REGISTRY, ("cast", "test-teacher"), method)
    loads = []
    import mmkit.core.loading as loading

    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    with pytest.raises(InputError, match=r"step 1 \(cast test-teacher\), teacher: .*nowhere"):
        run_recipe({"model": "tiny:bert", "max_samples": 8,
                    "steps": [{"step": "cast", "method": "test-teacher",
                               "teacher": str(tmp_path / "nowhere")}]}, tmp_path / "a")
    assert not loads and not (tmp_path / "a").exists()
    run_recipe({"model": "tiny:bert", "max_samples": 8,
                "steps": [{"step": "cast", "method": "test-teacher", "teacher": "tiny:bert"}]},
               tmp_path / "b")
    assert seen["tiny:bert"].kind == "tiny"


def test_registrations_load_without_torch():
    """`mmkit --help` lists every method without importing torch or transformers."""
    import subprocess
    import sys

    code = ("import sys, mmkit.cli.main; from mmkit.core.registry import all_methods; "
            "assert all_methods(); print(sorted(m for m in ('torch', 'transformers', 'peft') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
