"""mmkit export: write a model for another runtime (ONNX Runtime), checked against PyTorch."""

from __future__ import annotations

import click

from . import options


def _human(r: dict) -> str:
    fp32 = r["check"]["fp32"]
    kind = "int8 (dynamic)" if r["int8"] else "float32"
    what = r["task"] if r["head"] == "logits" else "feature extraction"
    line = (f"{r['artifact']}  ONNX {kind} of {r['model']} ({what}): "
            f"model.onnx {r['onnx_mb']:.1f} MB, opset {r['opset']}\n"
            f"  float32 vs PyTorch: max |diff| {fp32['max_abs_diff']:.2g} on "
            f"{sum(fp32['batches'])} inputs (within {fp32['atol']:g} + {fp32['rtol']:g} x each row's largest |value|)")
    int8 = r["check"].get("int8")
    if int8:
        agreement = "; ".join(
            f"{name}: " + (f"top-1 agreement {o['argmax_agreement']:.1%}" if "argmax_agreement"
                           in o else f"cosine {o['mean_cosine']:.4f} (lowest "
                                     f"{o['min_cosine']:.4f})")
            for name, o in int8["outputs"].items())
        line += (f"\n  int8 vs PyTorch: max |diff| {int8['max_abs_diff']:.3g}, {agreement}; "
                 f"float32 graph was {r['fp32_onnx_mb']:.1f} MB")
    decoding = fp32.get("decoding")
    if decoding:  # a causal LM: its graph takes and returns the KV cache
        line += (f"\n  KV cache: {decoding['new_tokens']} greedy steps on the graph's own cache "
                 f"vs PyTorch: max |diff| {decoding['max_abs_diff']:.2g}")
    return line


@click.command("export", cls=options.Command)
@options.model_argument
@click.option("--onnx", "to_onnx", is_flag=True, required=True,
              help="Export to ONNX for ONNX Runtime (the one target so far): model.onnx, "
                   "config.json, the tokenizer / processor and mmkit_onnx.json in OUT.")
@click.option("--int8", is_flag=True,
              help="Quantize the graph with ONNX Runtime's dynamic int8 (weights per channel, "
                   "embedding tables included); its distance to PyTorch is reported.")
@options.task_option
@options.output
@options.loading
@options.common
@options.with_models
def export_command(ref, to_onnx, int8, task, out, overwrite, allow_pickle, trust_remote_code,
                   as_json):
    """Export MODEL to OUT for ONNX Runtime (batch and sequence axes dynamic; causal LMs
    with their KV cache), after checking that the graph gives PyTorch's outputs on real
    inputs. A LoRA-style adapter is merged first."""
    from ..compression.onnx_export import export_onnx

    result = export_onnx(ref, out, task=task, int8=int8, overwrite=overwrite,
                         allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    options.emit(result, as_json, _human)
