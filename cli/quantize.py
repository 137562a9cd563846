"""mmkit quantize: weight quantization (bitsandbytes, RTN, GPTQ, dynamic int8), per-layer bits."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ..core.errors import InputError
from . import method_options as generated, options

log = logging.getLogger("mmkit")


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
    if rep.get("format"):  # rtn / gptq: compressed-tensors, or mmkit's own and why
        line += f"\n  format: {rep['format']}" + (f" ({rep['format_note']})"
                                                 if rep.get("format_note") else "")
    line += options.metric_lines(r)
    return line


@click.command("quantize", cls=options.Command)
@options.model_argument
@click.option("--bits", required=True, help="4, 8 (2-8 for rtn / gptq), or per-layer: "
              "'PATTERN=BITS,...,default=BITS' or a YAML / JSON file (16 keeps a layer float).")
@generated.method_option("quantize")
@generated.method_options("quantize", skip=("bits",))
@options.writes_a_model
def quantize_command(model, bits, method, do_eval, data_spec, out, overwrite, device,
                     allow_pickle, trust_remote_code, as_json, **settings):
    """Quantize MODEL's Linear weights and write OUT (task heads stay in floating point)."""
    bits = parse_bits(bits)
    if model == "-":
        model = options.one_model_from(model, "quantize")
    params = generated.step_params("quantize", method, settings, f"--method {method}")
    result = options.run_one_step(
        {"step": "quantize", "method": method, "bits": bits, **params}, model=model,
        data_spec=data_spec, out=out, eval_split="test" if do_eval else None,
        run=options.run_options(device, allow_pickle, trust_remote_code, overwrite))
    options.emit(result, as_json, _human)
