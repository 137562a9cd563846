"""mmkit quantize: weight quantization (bitsandbytes, RTN, GPTQ, dynamic int8), per-layer bits."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ..core.errors import InputError
from . import options

log = logging.getLogger("mmkit")
METHODS = ("rtn", "gptq", "dynamic-int8", "ptq", "nf4", "fp4", "int8")
# CLI option -> config key, for options only some methods take
METHOD_OPTIONS = {"group_size": "--group-size", "symmetric": "--symmetric", "calib": "--calib",
                  "calib_samples": "--calib-samples", "calib_length": "--calib-length",
                  "act_order": "--act-order", "double_quant": "--no-double-quant",
                  "a_bits": "--a-bits", "softmax_bits": "--softmax-bits", "skip": "--skip"}


def parse_bits(value: str):
    """`4`; `PATTERN=BITS,...,default=BITS`; or a YAML / JSON file holding that mapping."""
    from ..core.errors import shown

    value = value.strip()
    if value.isdigit():
        return int(value)
    if Path(value).suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            mapping = yaml.safe_load(Path(value).read_text())
        except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as exc:
            raise InputError(f"--bits {shown(value)}: cannot read the bits mapping "
                             f"({shown(exc)}).") from None
    else:
        mapping = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            pattern, sep, bits = part.rpartition("=")
            if not sep:
                raise InputError(f"--bits {shown(value)}: '{shown(part, 60)}' is neither a whole "
                                 "number of bits nor PATTERN=BITS (e.g. 4, or "
                                 "'mlp.*=4,default=8').")
            mapping[pattern] = bits
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(f"--bits {shown(value)}: expected a number, or PATTERN=BITS pairs such "
                         "as 'mlp.*=4,self_attn.*=8,default=4', or a YAML / JSON file of them.")
    out = {}
    for pattern, bits in mapping.items():
        whole = isinstance(bits, int) and not isinstance(bits, bool)
        if not (whole or (isinstance(bits, str) and bits.strip().isdigit())):
            raise InputError(f"--bits {shown(value)}: '{shown(pattern, 60)}' has "
                             f"{shown(bits, 60)!r} bits; every pattern needs a whole number of "
                             "bits (PATTERN=BITS; 16 keeps a layer in floating point).")
        out[str(pattern)] = int(bits)
    return out


def _human(r: dict) -> str:
    rep = r["steps"][0]["report"]
    bpw = f", {rep['bits_per_weight']:.2f} bits per weight" if rep.get("bits_per_weight") else ""
    size = (f", weights {rep['weights_mb_before']:.1f} -> {rep['weights_mb_after']:.1f} MB"
            if "weights_mb_after" in rep else "")
    simulated = (f" (simulated W{rep['bits']}A{rep['a_bits']}: rounded values kept in floating "
                 "point)" if rep.get("simulated") else "")
    line = (f"{r['artifact']}  {rep['method']} on {r['model']}: {rep['layers_quantized']} layers"
            f"{bpw}{size}{simulated}")
    line += options.metric_lines(r)
    return line


@click.command("quantize", cls=options.Command)
@options.model_argument
@click.option("--bits", required=True, help="4, 8 (2-8 for rtn / gptq), or per-layer: "
              "'PATTERN=BITS,...,default=BITS' or a YAML / JSON file (16 keeps a layer float).")
@click.option("--method", type=click.Choice(METHODS), help="Default: picked for the device and "
              "bits (CUDA: nf4 / int8; CPU: dynamic-int8 at 8 bits, rtn for causal LMs; gptq "
              "with --calib, else rtn).")
@click.option("--group-size", type=click.IntRange(min=0),
              help="Columns sharing a scale (rtn, gptq); 0 = one per output channel. [default: 128]")
@click.option("--symmetric", is_flag=True, default=None, help="Symmetric grid (rtn, gptq).")
@click.option("--act-order/--no-act-order", default=None,
              help="GPTQ: quantize columns by decreasing Hessian diagonal. [default: on]")
@click.option("--calib", help="Calibration data for gptq / ptq (any --data reference).")
@click.option("--calib-samples", type=click.IntRange(min=1), help="[default: 128]")
@click.option("--calib-length", type=click.IntRange(min=8), help="Tokens per calibration sample. "
                                                                 "[default: 256]")
@click.option("--a-bits", type=click.IntRange(4, 8), help="ptq: activation bits. [default: 8]")
@click.option("--softmax-bits", type=click.IntRange(0, 8),
              help="ptq: log2 bits of attention probabilities, 0 = float. [default: 4]")
@click.option("--no-double-quant", "double_quant", flag_value=False, default=None,
              help="nf4 / fp4: do not quantize the scales again.")
@click.option("--skip", multiple=True, help="Leave layers matching this pattern in floating "
                                            "point (repeatable; task heads always are).")
@click.option("--eval", "do_eval", is_flag=True, help="Score the result on the test split.")
@options.data
@options.output
@options.device()
@options.loading
@options.common
def quantize_command(model, bits, method, skip, do_eval, task, data, text_column,
                     image_column, label_column, max_samples, seed, out, overwrite, device,
                     allow_pickle, trust_remote_code, as_json, **settings):
    """Quantize MODEL's Linear weights and write OUT (task heads stay in floating point)."""
    from ..core.loading import resolve_device
    from ..core.registry import get_method

    bits = parse_bits(bits)
    if model == "-":
        model = options.models_from(model)[0]
    if method is None:
        from ..compression.quantize.methods import pick_method
        from ..core.loading import peek

        kind = peek(model, task, trust_remote_code)[2]
        method, why = pick_method(bits, resolve_device(device), settings.get("calib"), kind)
        log.info("quantize: using %s (%s); choose with --method", method, why)
    fields = get_method("quantize", method).config.model_fields
    params = {"bits": bits, **options.method_params(
        {**settings, "skip": skip}, fields, METHOD_OPTIONS, f"--method {method}")}
    for key in ("group_size", "softmax_bits"):  # 0 means none
        if key in params:
            params[key] = params[key] or None
    result = options.run_one_step(
        {"step": "quantize", "method": method, **params}, model=model, task=task, data=data,
        text_column=text_column, image_column=image_column, label_column=label_column,
        max_samples=max_samples, seed=seed, eval_split="test" if do_eval else None, out=out,
        overwrite=overwrite, device=device, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code)
    options.emit(result, as_json, _human)
