"""Quantization helpers with Ascend CANN's bit-exact semantics (the public
face of :mod:`jax_mc2.framework.quant`)."""

from jax_mc2.framework.quant import (
    from_fractal_nz,
    group_size,
    hifloat8_decode,
    hifloat8_encode,
    mx_quantize,
    packed_scale_words,
    perblock_quantize,
    resolve_group_size,
    to_fractal_nz,
    trans_quant_param,
    unpack_group_size,
    unpack_trans_quant_param,
)

__all__ = [
    "from_fractal_nz",
    "group_size",
    "hifloat8_decode",
    "hifloat8_encode",
    "mx_quantize",
    "packed_scale_words",
    "perblock_quantize",
    "resolve_group_size",
    "to_fractal_nz",
    "trans_quant_param",
    "unpack_group_size",
    "unpack_trans_quant_param",
]
