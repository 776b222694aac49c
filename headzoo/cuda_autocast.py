"""CUDA's autocast, emulated on CPU tensors (fake ones, for `headzoo estimate`), from CUDA's own op lists.

CPU autocast casts other ops than CUDA autocast does (CUDA runs softmax, log_softmax, sum, exp, log and
logsumexp in fp32 and einsum in fp16; CPU autocast casts cross_entropy_loss, max_pool3d, avg_pool3d, cat
and stack, which CUDA leaves alone) and defaults to bf16, so a CPU autocast run does not hold what a GPU
holds. Fake CUDA tensors cannot run a backward on a CPU-only torch, so the estimate runs on fake CPU tensors
and, while `cuda_autocast_kernels` is active, the CPU's autocast kernels are replaced by ones that apply
CUDA's policy to CUDA's ops with fp16, as torch's C++ wrappers do: the casts happen above autograd (what
autograd saves for backward is the fp16 copy), fp16 copies of fp32 leaf parameters are cached until
the autocast region ends, and ops CUDA does not list run uncast.

The lists are torch 2.13's AutocastCUDA registrations; tests/test_estimate.py reads the installed torch's
dispatch table and probes every one of its AutocastCUDA kernels, and fails when these lists drift.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch
from torch import Tensor

#: inputs cast to fp16 (CUDA's lower precision)
LOWER_PRECISION_FP = (
    "_convolution",
    "_convolution.deprecated",
    "_scaled_dot_product_flash_attention",
    "_thnn_fused_gru_cell",
    "_thnn_fused_lstm_cell",
    "addbmm",
    "addmm",
    "addmv",
    "addr",
    "baddbmm",
    "bmm",
    "chain_matmul",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_tbc",
    "conv_transpose1d",
    "conv_transpose2d.input",
    "conv_transpose3d.input",
    "convolution",
    "cudnn_convolution",
    "cudnn_convolution_transpose",
    "einsum",
    "gru_cell",
    "linalg_multi_dot",
    "linalg_vecdot",
    "linear",
    "lstm_cell",
    "matmul",
    "mm",
    "mv",
    "prelu",
    "rnn_relu_cell",
    "rnn_tanh_cell",
    "scaled_dot_product_attention",
)
#: inputs cast to fp32
FP32 = (
    "_upsample_bicubic2d_aa",
    "_upsample_bilinear2d_aa",
    "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d",
    "acos",
    "asin",
    "binary_cross_entropy_with_logits",
    "cdist",
    "cosh",
    "cosine_embedding_loss",
    "cosine_similarity",
    "dist",
    "erfinv",
    "exp",
    "expm1",
    "frobenius_norm.dim",
    "group_norm",
    "hinge_embedding_loss",
    "huber_loss",
    "kl_div",
    "l1_loss",
    "layer_norm",
    "log",
    "log10",
    "log1p",
    "log2",
    "logsumexp",
    "margin_ranking_loss",
    "mse_loss",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "native_layer_norm",
    "nll_loss",
    "nll_loss2d",
    "nuclear_norm",
    "nuclear_norm.dim",
    "pdist",
    "poisson_nll_loss",
    "pow.Scalar",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "reciprocal",
    "renorm",
    "rms_norm",
    "rsqrt",
    "sinh",
    "smooth_l1_loss",
    "soft_margin_loss",
    "softplus",
    "tan",
    "triplet_margin_loss",
    "upsample_bicubic2d",
    "upsample_bilinear2d",
    "upsample_linear1d",
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "upsample_trilinear3d",
)
#: an unset `dtype` argument set to fp32 (the input is not copied), when the first input is floating point
FP32_SET_OPT_DTYPE = (
    "cumprod",
    "cumsum",
    "linalg_matrix_norm",
    "linalg_matrix_norm.str_ord",
    "linalg_vector_norm",
    "log_softmax.int",
    "prod",
    "prod.dim_int",
    "softmax.int",
    "sum",
    "sum.dim_IntList",
)
#: redispatched to the overload that takes a dtype, with fp32 appended (op → that overload)
FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
#: inputs cast to the widest floating type among them
PROMOTE = (
    "addcdiv",
    "addcmul",
    "atan2",
    "bilinear",
    "cross",
    "dot",
    "grid_sampler",
    "index_put",
    "scatter_add",
    "tensordot",
    "vdot",
)
#: refused under CUDA autocast
BANNED = ("binary_cross_entropy",)

POLICIES = {
    **dict.fromkeys(LOWER_PRECISION_FP, "lower_precision_fp"),
    **dict.fromkeys(FP32, "fp32"),
    **dict.fromkeys(FP32_SET_OPT_DTYPE, "fp32_set_opt_dtype"),
    **dict.fromkeys(FP32_APPEND_DTYPE, "fp32_append_dtype"),
    **dict.fromkeys(PROMOTE, "promote"),
    **dict.fromkeys(BANNED, "banned"),
}
HALF = torch.float16  # CUDA autocast's default lower precision, and nnU-Net's
#: softmax of a CUDA half tensor into fp32 runs as one kernel (ATen's softmax: `_softmax(x, dim, half_to_float)`), no
#: fp32 copy of its input; CPU kernels lack it, fake tensors have it (the emulation runs on fake tensors only)
HALF_TO_FLOAT = {"softmax.int": torch.ops.aten._softmax.default, "log_softmax.int": torch.ops.aten._log_softmax.default}


def _op(name: str) -> torch._ops.OpOverload:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(value) -> bool:
    """A tensor autocast may cast: floating point on the emulated device, not fp64 (C++ `is_eligible`)."""
    return (
        isinstance(value, Tensor)
        and value.is_floating_point()
        and value.device.type == "cpu"
        and value.dtype != torch.float64
    )


class _Casts:
    """The casts of one emulation (C++ `cached_cast`): fp16 copies of fp32 leaf tensors that require grad
    (the parameters) are made once per autocast region and reused, as on a GPU."""

    def __init__(self):
        self.cache: dict[int, tuple[weakref.ref, Tensor]] = {}
        self.caching = False

    def cast(self, value, dtype: torch.dtype):
        if isinstance(value, (list, tuple)):
            return type(value)(self.cast(v, dtype) for v in value)
        if not _eligible(value) or value.dtype == dtype:
            return value
        if (
            self.caching
            and dtype == HALF
            and value.dtype == torch.float32
            and value.requires_grad
            and value.is_leaf
            and not value._is_view()
        ):
            hit = self.cache.get(id(value))
            if hit is None or hit[0]() is not value:
                hit = self.cache[id(value)] = (weakref.ref(value), value.to(dtype))
            return hit[1]
        return value.to(dtype)


def _tensors(values):
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _tensors(value)
        elif _eligible(value):
            yield value


def _kernel(name: str, casts: _Casts):
    """A Python AutocastCPU kernel applying CUDA's policy for `name`, as torch's C++ wrapper for CUDA does."""
    policy, op = POLICIES[name], _op(name)
    schema = op._schema.arguments
    dtype_index = next((i for i, a in enumerate(schema) if a.name == "dtype"), None)

    def run(*args, **kwargs):
        if policy == "banned":
            raise RuntimeError(f"torch.{name} is unsafe to autocast (CUDA autocast refuses it)")
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            if policy in ("lower_precision_fp", "fp32", "promote"):
                if policy == "promote":
                    to = (
                        torch.float32
                        if any(t.dtype == torch.float32 for t in _tensors([*args, *kwargs.values()]))
                        else HALF
                    )
                else:
                    to = HALF if policy == "lower_precision_fp" else torch.float32
                return op(*casts.cast(args, to), **{k: casts.cast(v, to) for k, v in kwargs.items()})
            first = _eligible(args[0])
            if policy == "fp32_set_opt_dtype":
                unset = (args[dtype_index] if dtype_index < len(args) else kwargs.get("dtype")) is None
                if not (first and unset):
                    return op(*args, **kwargs)
                if name in HALF_TO_FLOAT and args[0].dtype == HALF:
                    return HALF_TO_FLOAT[name](args[0], args[1], True)
                if dtype_index < len(args):
                    return op(*args[:dtype_index], torch.float32, *args[dtype_index + 1 :], **kwargs)
                return op(*args, **{**kwargs, "dtype": torch.float32})
            full = [*args, *(a.default_value for a in schema[len(args) :] if not a.kwarg_only)]  # fp32_append_dtype
            return _op(FP32_APPEND_DTYPE[name])(*full, **kwargs, dtype=torch.float32 if first else args[0].dtype)

    return run


class Emulation:
    """CUDA's autocast kernels in place of the CPU's; `region()` is what ``torch.autocast("cuda")`` is on a GPU."""

    def __init__(self, casts: _Casts):
        self._casts = casts

    @contextlib.contextmanager
    def region(self):
        with torch.autocast("cpu", dtype=HALF):
            self._casts.caching = True
            try:
                yield
            finally:
                self._casts.caching = False
                self._casts.cache.clear()  # as leaving torch.autocast clears its cast cache


@contextlib.contextmanager
def cuda_autocast_kernels():
    """While active, CPU autocast (fp16) casts as CUDA autocast does: CUDA's ops with CUDA's policies, every other
    op uncast. Process-wide (the dispatcher's table): used by `headzoo estimate` around its fake runs only."""
    casts = _Casts()
    library = torch.library.Library("aten", "IMPL")
    cpu_only = [
        n.removeprefix("aten::")
        for n in torch._C._dispatch_get_all_op_names()
        if n.startswith("aten::")
        and torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCPU")
        and n.removeprefix("aten::") not in POLICIES
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": the point of it
            for name in POLICIES:
                library.impl(name, _kernel(name, casts), "AutocastCPU")
            for name in cpu_only:
                library.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        yield Emulation(casts)
    finally:
        library._destroy()
