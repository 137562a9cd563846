"""The registry drives the tests and the command line: every registered method has a test row,
and every command offers exactly the registered methods of its step."""

import click
import pytest

from mmkit.core.registry import all_methods

# Steps whose methods have a test matrix; each file checks there is one row per method.
MATRICES = {"finetune": "FINETUNE in tests/test_finetune.py",
            "quantize": "QUANTIZE in tests/test_quantize.py",
            "prune": "PRUNE in tests/test_prune.py"}
# Methods of the other steps, each with the tests that cover it.
OTHER = {
    ("cast", "dtype"): "tests/conftest.py's tiny_artifacts casts every tiny family to float32 "
                       "and test_artifacts reloads them; test_recipe runs recipes/fp16-eval.yaml",
    ("merge", "linear"): "tests/test_merge.py: every tiny family against tensors.linear "
                         "longhand, identical models, heads of other tasks kept, --as-adapter",
    ("merge", "task-arithmetic"): "tests/test_merge.py: every tiny family longhand; one model "
                                  "at lambda 1; one LoRA / rsLoRA / SVFit adapter = its merge",
    ("merge", "ties"): "tests/test_merge.py: every tiny family longhand (model-scope trim); "
                       "two LoRA adapters; the CLI with --eval",
    ("merge", "dare-linear"): "tests/test_merge.py: every tiny family longhand (seeded per "
                              "tensor); identical models at density 1",
    ("merge", "dare-ties"): "tests/test_merge.py: every tiny family longhand; merge then "
                            "quantize in one recipe",
    ("merge", "slerp"): "tests/test_merge.py: every tiny family against tensors.slerp "
                        "longhand; identical models",
    ("merge", "adapter"): "tests/test_merge.py: `mmkit merge ADAPTER` equals finetune --merge",
    ("merge", "greedy-soup"): "tests/test_merge_tuned.py: keeps what helps, never below the "
                              "best single on validation, weights = mean of the ingredients",
    ("extract", "subnet"): "tests/test_elastic.py: equals the sliced super-network (bert, "
                           "vit, llama, clip; per-layer widths), plain from_pretrained for "
                           "uniform ViT widths, cuts outside the space refused, in search",
    ("merge", "atlas"): "tests/test_merge_tuned.py: beats task arithmetic on its few-shot data "
                        "(measured by plain forwards), weights = base + reported coefficients",
    ("tokens", "tome"): "tests/test_tokens.py: the merge against a longhand one, proportional "
                        "attention against a longhand block, r = 0 exact, ViT and CLIP, save -> "
                        "load, later steps keep it, the search knob",
    ("tokens", "transform"): "tests/test_tokens.py: against a longhand many-to-many merge; ToMe "
                             "at a low temperature; save -> load",
}
# `mmkit COMMAND` and the step whose methods it offers
COMMANDS = {"finetune": "finetune", "quantize": "quantize", "prune": "prune", "merge": "merge",
            "merge-tokens": "tokens"}


def test_every_registered_method_has_a_test_row():
    registered = {(m.step, m.name) for m in all_methods()}
    problems = [f"{step} method '{name}' is registered but has no test row: add a matrix for "
                f"step '{step}' (like PRUNE in tests/test_prune.py, listed in MATRICES here) or "
                f"a row to OTHER in tests/test_registry_matrix.py"
                for step, name in sorted(registered)
                if step not in MATRICES and (step, name) not in OTHER]
    problems += [f"OTHER in tests/test_registry_matrix.py has a row for {step} method '{name}', "
                 f"which is not registered: remove it"
                 for step, name in sorted(set(OTHER) - registered)]
    assert not problems, "\n".join(problems)


def offered_methods(command: click.Command) -> set[str]:
    """The method names a command accepts: the choices of its options that set `method`
    (quantize's and prune's --method) and the values of its method flags (finetune's --lora,
    --dora, ...). Order, help text and defaults do not matter."""
    names = set()
    for param in command.params:
        if param.name == "elastic_mode":  # finetune --elastic nested|sampled
            names.add("elastic")
        if param.name != "method":
            continue
        if isinstance(param.type, click.Choice):
            names |= {str(choice) for choice in param.type.choices}
        elif getattr(param, "is_flag", False):
            names.add(str(param.flag_value))
    return names


@pytest.mark.parametrize("command", COMMANDS)
def test_command_offers_exactly_the_registered_methods(command):
    from mmkit.cli.main import cli

    step = COMMANDS[command]
    offered = offered_methods(cli.get_command(click.Context(cli), command))
    registered = {m.name for m in all_methods() if m.step == step}
    if step == "quantize":  # `auto` picks a method for the device, registered or not
        offered, registered = offered - {"auto"}, registered - {"auto"}
    assert offered == registered, (
        f"mmkit {command}: registered {step} methods it does not offer: "
        f"{sorted(registered - offered)}; offered methods that are not registered: "
        f"{sorted(offered - registered)}")
