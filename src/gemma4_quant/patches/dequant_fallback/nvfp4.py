"""NVFP4 layers without a kernel, ModelOpt's and compressed-tensors': dequantized once at load.

vLLM's NVFP4 kernels are GPU kernels (CUTLASS, FlashInfer, Marlin FP4, emulation through
Triton), for linears and experts alike. On CPU ``init_nvfp4_linear_kernel`` raises
``ValueError: Failed to find a kernel that can implement the NVFP4 linear layer`` and
``select_nvfp4_moe_backend`` raises ``NotImplementedError: No NvFp4 MoE backend supports
the deployment configuration`` while the model is built, so no NVFP4 checkpoint can be
built there: neither ModelOpt's (nvidia's Gemma 4 export) nor compressed-tensors'
(llm-compressor NVFP4 W4A4, RedHatAI's ``gemma-4-26B-A4B-it-NVFP4``).

Where exactly those errors are raised, the layer keeps vLLM's own parameters, placed by
vLLM's loader as always, and ``process_weights_after_loading`` dequantizes them once to the
model dtype (``gemma4_quant.int4``: exact, rounded once):

- Experts get ``ModelOptNvFp4DequantizedMoEMethod`` (``ModelOptNvFp4Config.
  get_quant_method``) or ``CompressedTensorsNvFp4DequantizedMoEMethod``
  (``CompressedTensorsMoEMethod.get_moe_method``). Their buffers are registered by vLLM's
  own ``ModelOptNvFp4FusedMoE.create_weights`` / ``CompressedTensorsW4A4Nvfp4MoEMethod.
  create_weights``, on an instance that skipped the backend selection; once loaded they
  become ``w13_weight`` / ``w2_weight`` and ``UnquantizedFusedMoEMethod`` takes over.
- Linears get ``DequantizedNvFp4LinearKernel`` from the ``init_nvfp4_linear_kernel`` that
  ModelOpt's linear method and compressed-tensors' ``CompressedTensorsW4A4Fp4`` scheme
  call; it turns their tensors into ``weight`` for ``UnquantizedLinearMethod``.

Where the linear methods pick an ``NvFp4LinearBackend`` instead
(``select_nvfp4_linear_backend``, which raises ``ValueError: No NVFP4 GEMM backend
selected`` on CPU) and vLLM's ``nvfp4_utils`` functions dispatch on it in
``process_weights_after_loading`` and ``apply``, the same kernel object stands in for
the backend, and the methods hand the layer to it. Where the NVFP4 MoE oracle imports
a backend's kernel module that needs a missing GPU library (FlashInfer's TRT-LLM experts
``import flashinfer`` at their top), that backend counts as unsupported, so that the
oracle reaches its no-backend error instead of ``ModuleNotFoundError``.

Values: ModelOpt ``(e2m1 * weight_scale) * weight_scale_2``; compressed-tensors
``e2m1 * (weight_scale / weight_global_scale)`` (it stores the global scale as a divisor),
every fused shard (q/k/v, gate/up) with its own global scale (vLLM's kernels use their
maximum for all shards; llm-compressor gives fused shards one value).
The activations stay in the model dtype: the weight-only semantics of vLLM's own Marlin FP4
path (GPUs without FP4 tensor cores, such as Hopper). The checkpoints' input scales
(activation quantization to FP4 on Blackwell) are loaded and unused. One warning per
model says so.
"""

from __future__ import annotations

import ast
import functools
import importlib
from itertools import accumulate, pairwise
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from ... import envs, vllm_code
from .. import vllm_source, wrap_once
from .common import (
    COST_REPORT,
    _nbytes,
    install_unquantized,
    install_unquantized_experts,
    keep_checkpoint_sizes,
    route_to_kernel,
)

MODELOPT_MODULE = "vllm.model_executor.layers.quantization.modelopt"
_MODELOPT_FILE = "model_executor/layers/quantization/modelopt.py"
_ORACLE_FILE = "model_executor/layers/fused_moe/oracle/nvfp4.py"
_CT = "model_executor/layers/quantization/compressed_tensors/"
_CT_LINEAR_FILE = _CT + "schemes/compressed_tensors_w4a4_nvfp4.py"
CT_LINEAR_MODULE = "vllm." + _CT_LINEAR_FILE.removesuffix(".py").replace("/", ".")
# compressed-tensors' NVFP4 MoE method: in a module of its own (0.20+), or the factory's
_CT_MOE = "CompressedTensorsW4A4Nvfp4MoEMethod"
_CT_MOE_FILES = (
    _CT + "compressed_tensors_moe/compressed_tensors_moe_w4a4_nvfp4.py",
    _CT + "compressed_tensors_moe.py",
)
NO_NVFP4_MOE_KERNEL = "No NvFp4 MoE backend supports the deployment configuration"
NO_NVFP4_LINEAR_KERNEL = "Failed to find a kernel that can implement the NVFP4 linear layer"
# How NVFP4 linear methods get their kernel: a kernel object that processes and applies
# (``init_nvfp4_linear_kernel``), or a backend enum that vLLM's ``nvfp4_utils`` functions
# dispatch on (``select_nvfp4_linear_backend``, 0.19), each with its refusal.
PICK_KERNEL = "init_nvfp4_linear_kernel"
PICK_BACKEND = "select_nvfp4_linear_backend"
NO_NVFP4_GEMM_BACKEND = "No NVFP4 GEMM backend selected"
_NO_LINEAR = {PICK_KERNEL: NO_NVFP4_LINEAR_KERNEL, PICK_BACKEND: NO_NVFP4_GEMM_BACKEND}
_NVFP4_UTILS_FILE = "model_executor/layers/quantization/utils/nvfp4_utils.py"
_MARK = "__gemma4_quant_nvfp4_fallback__"
_WHY = "activations stay in the model dtype, as on vLLM's Marlin FP4 path"
_PARAMS = (
    "w13_weight",
    "w2_weight",
    "w13_weight_scale",
    "w2_weight_scale",
    "w13_weight_scale_2",
    "w2_weight_scale_2",
    "w13_input_scale",
    "w2_input_scale",
)
_CT_MOE_PARAMS = (
    "w13_weight_packed",
    "w2_weight_packed",
    "w13_weight_scale",
    "w2_weight_scale",
    "w13_weight_global_scale",
    "w2_weight_global_scale",
    "w13_input_global_scale",
    "w2_input_global_scale",
)


def _self_attributes(node: ast.AST) -> set[str]:
    """The attributes of ``self`` that ``node`` reads or writes."""
    return {
        child.attr
        for child in ast.walk(node)
        if isinstance(child, ast.Attribute) and vllm_code.is_name(child.value, "self")
    }


def nvfp4_moe_recognized() -> bool:
    """ModelOpt's NVFP4 MoE method asks the backend oracle in ``__init__`` and registers
    the checkpoint's tensors (weight, weight_scale, weight_scale_2, input_scale) in
    ``create_weights``, from ``quant_config``, ``moe`` and ``use_global_sf`` alone."""
    text = vllm_source(_MODELOPT_FILE)
    method = vllm_code.find_class(text, "ModelOptNvFp4FusedMoE")
    init = vllm_code.find_function(text, "ModelOptNvFp4FusedMoE.__init__")
    create = vllm_code.find_function(text, "ModelOptNvFp4FusedMoE.create_weights")
    oracle = vllm_code.parse(vllm_source(_ORACLE_FILE) or "")
    if method is None or init is None or create is None or oracle is None:
        return False
    registered = set(vllm_code.strings(create))
    from . import _EXPERT_LOADERS

    loaders = (vllm_code.find_function(vllm_source(f), name) for f, name in _EXPERT_LOADERS)
    loader = next((found for found in loaders if found is not None), None)
    return (
        # the experts' loader takes ModelOpt's scale paths by the method's class name
        vllm_code.has_string(loader, "ModelOpt")
        and any(vllm_code.calls(init, "select_nvfp4_moe_backend"))
        and vllm_code.has_string(oracle, NO_NVFP4_MOE_KERNEL)
        and set(_PARAMS) <= registered
        and _self_attributes(create) <= {"quant_config", "moe", "use_global_sf"}
    )


def ct_nvfp4_moe_module() -> str | None:
    """The module of compressed-tensors' NVFP4 MoE method where the fallback reproduces its
    buffers (None: it does not): the factory builds it, it asks the backend oracle in
    ``__init__`` and registers the checkpoint's tensors (packed weights, group scales,
    global scales, input global scales) in ``create_weights`` from ``moe`` and
    ``group_size`` alone."""
    from . import factory_builds, method_functions

    oracle = vllm_code.parse(vllm_source(_ORACLE_FILE) or "")
    if not factory_builds(_CT_MOE):
        return None
    if not vllm_code.has_string(oracle, NO_NVFP4_MOE_KERNEL):
        return None
    found = method_functions(_CT_MOE_FILES, _CT_MOE)
    if found is None:
        return None
    relpath, init, create = found
    recognized = (
        any(vllm_code.calls(init, "select_nvfp4_moe_backend"))
        and set(_CT_MOE_PARAMS) <= set(vllm_code.strings(create))
        and _self_attributes(create) <= {"moe", "group_size"}
    )
    return "vllm." + relpath.removesuffix(".py").replace("/", ".") if recognized else None


def nvfp4_linear_choice() -> str | None:
    """The function NVFP4 linear methods pick their kernel with (``PICK_KERNEL`` or
    ``PICK_BACKEND``), where it raises the refusal the fallback catches; None: neither."""
    from . import _LINEAR_KERNELS_FILE

    if vllm_code.has_string(
        vllm_code.parse(vllm_source(_LINEAR_KERNELS_FILE) or ""), NO_NVFP4_LINEAR_KERNEL
    ):
        return PICK_KERNEL
    utils = vllm_source(_NVFP4_UTILS_FILE)
    dispatch = ("convert_to_nvfp4_linear_kernel_format", "apply_nvfp4_linear")
    if vllm_code.has_string(
        vllm_code.find_function(utils, PICK_BACKEND), NO_NVFP4_GEMM_BACKEND
    ) and all(vllm_code.find_function(utils, name) is not None for name in dispatch):
        return PICK_BACKEND
    return None


def _recognized_linear_method(text: str | None, method: str, apply: str) -> ast.AST | None:
    """``method``'s ``create_weights``, where ``method`` picks its NVFP4 kernel in
    ``__init__`` the way ``nvfp4_linear_choice`` found and runs it from ``apply`` (and,
    with a backend enum, converts the tensors with it in ``process_weights_after_loading``);
    None where it does not."""
    init = vllm_code.find_function(text, f"{method}.__init__")
    create = vllm_code.find_function(text, f"{method}.create_weights")
    process = vllm_code.find_function(text, f"{method}.process_weights_after_loading")
    run = vllm_code.find_function(text, f"{method}.{apply}")
    choice = nvfp4_linear_choice()
    if None in (init, create, process, run, choice) or not any(vllm_code.calls(init, choice)):
        return None
    if choice == PICK_KERNEL:
        recognized = any(vllm_code.calls(run, "apply_weights"))
    else:
        recognized = any(vllm_code.calls(process, "convert_to_nvfp4_linear_kernel_format")) and any(
            vllm_code.calls(run, "apply_nvfp4_linear")
        )
    return create if recognized else None


def ct_nvfp4_linear_recognized() -> bool:
    """compressed-tensors' NVFP4 linear scheme picks its kernel in ``__init__`` (where
    vLLM refuses), registers ``weight_packed`` / ``weight_scale`` / ``weight_global_scale``
    per shard of ``logical_widths`` and runs the kernel from ``apply_weights``."""
    text = vllm_source(_CT_LINEAR_FILE)
    create = _recognized_linear_method(text, "CompressedTensorsW4A4Fp4", "apply_weights")
    return (
        create is not None
        and {"weight_packed", "weight_scale", "weight_global_scale"}
        <= set(vllm_code.strings(create))
        and vllm_code.has_code(create, "layer.logical_widths = output_partition_sizes")
    )


def modelopt_nvfp4_linear_recognized() -> bool:
    """ModelOpt's NVFP4 linears get their kernel object from ``init_nvfp4_linear_kernel``,
    which processes the tensors as vLLM's method hands them over; or its NVFP4 linear
    method picks a backend in ``__init__`` and registers ``weight`` / ``weight_scale`` /
    ``weight_scale_2``."""
    text = vllm_source(_MODELOPT_FILE)
    if nvfp4_linear_choice() == PICK_KERNEL:
        return any(vllm_code.calls(vllm_code.parse(text or ""), PICK_KERNEL))
    create = _recognized_linear_method(text, "ModelOptNvFp4LinearMethod", "apply")
    return create is not None and {"weight", "weight_scale", "weight_scale_2"} <= set(
        vllm_code.strings(create)
    )


def patch_modelopt(module: ModuleType, moe: bool, linear: bool) -> None:
    """ModelOpt's NVFP4 experts (``get_quant_method``) and its NVFP4 linears, those the
    fallback recognizes."""

    def make(original: Any) -> Any:
        def get_quant_method(self, layer, prefix: str):  # noqa: ANN001
            try:
                return original(self, layer, prefix)
            except NotImplementedError as exc:
                if not _falls_back(exc, NO_NVFP4_MOE_KERNEL):
                    raise
                if getattr(layer, "moe_config", None) is None:
                    raise
                reason = str(exc)
            return dequantized_nvfp4_moe_method_class()(self, layer.moe_config, reason)

        return get_quant_method

    if moe:
        wrap_once(module.ModelOptNvFp4Config, "get_quant_method", _MARK, make)
    if not linear:
        return
    if callable(getattr(module, PICK_KERNEL, None)):
        # the kernel object processes the tensors as vLLM's method hands them over
        wrap_once(module, PICK_KERNEL, _MARK, _linear_kernel_choice(PICK_KERNEL))
        return
    _patch_linear_method(module, module.ModelOptNvFp4LinearMethod, "apply", "weight")


def patch_ct_linear(module: ModuleType) -> None:
    """``CompressedTensorsW4A4Fp4``: the fallback kernel where vLLM has none; its layers'
    cost goes into the model's one warning as they are built, and the kernel processes
    the tensors as loaded (vLLM's scheme would rename them and keep one global scale for
    all shards)."""
    _patch_linear_method(module, module.CompressedTensorsW4A4Fp4, "apply_weights", "weight_packed")


def _patch_linear_method(module: ModuleType, method: type, apply: str, packed: str) -> None:
    """An NVFP4 linear method of ``module`` gets the fallback kernel where vLLM picks
    none; on such a layer the kernel announces it when built (``packed``: its codes),
    processes the tensors as loaded and runs it (``apply``: the method's entry)."""
    choice = PICK_KERNEL if callable(getattr(module, PICK_KERNEL, None)) else PICK_BACKEND
    wrap_once(module, choice, _MARK, _linear_kernel_choice(choice))

    def fallback_kernel(method: Any) -> Any:
        # the kernel object, or what vLLM keeps as its backend enum
        kernel = getattr(method, "kernel", getattr(method, "backend", None))
        return kernel if isinstance(kernel, dequantized_nvfp4_linear_kernel_class()) else None

    def make_create(original: Any) -> Any:
        def create_weights(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> None:  # noqa: ANN001
            original(self, layer, *args, **kwargs)
            kernel = fallback_kernel(self)
            if kernel is not None:
                kernel.announce(layer, getattr(layer, packed), layer.weight_scale)

        return create_weights

    def process(kernel: Any, layer: torch.nn.Module) -> None:
        if packed == "weight_packed":
            return kernel.process_compressed_tensors(layer)
        return kernel.process_weights_after_loading(layer)

    wrap_once(method, "create_weights", _MARK, make_create)
    route_to_kernel(method, apply, _MARK, fallback_kernel, process)


ORACLE_MODULE = "vllm." + _ORACLE_FILE.removesuffix(".py").replace("/", ".")


def oracle_imports_backends() -> bool:
    """The NVFP4 MoE oracle imports a backend's kernel module when it asks that backend
    whether it supports the layer (``backend_to_kernel_cls``), and goes on to the next
    one, up to its no-backend error, where the answer is no. A kernel module that imports
    a GPU library at its top (FlashInfer's TRT-LLM experts on some releases) then fails
    the selection with ``ModuleNotFoundError`` before that error."""
    text = vllm_source(_ORACLE_FILE)
    kernels = vllm_code.find_function(text, "backend_to_kernel_cls")
    select = vllm_code.find_function(text, "select_nvfp4_moe_backend")
    return (
        kernels is not None
        and any(isinstance(node, ast.ImportFrom) for node in ast.walk(kernels))
        and any(vllm_code.calls(select, "backend_to_kernel_cls"))
        and any(vllm_code.calls(select, "is_supported_config"))
        and vllm_code.has_string(select, NO_NVFP4_MOE_KERNEL)
    )


def unimportable_moe_backend() -> str | None:
    """The first package that a kernel module the NVFP4 MoE oracle imports needs at its
    top and this environment lacks (None: every one imports): vLLM's backend selection
    stops on it with ``ModuleNotFoundError`` where ``patch_moe_oracle`` is not applied."""
    import importlib.util

    kernels = vllm_code.find_function(vllm_source(_ORACLE_FILE), "backend_to_kernel_cls")
    imports = [n for n in ast.walk(kernels or ast.Module()) if isinstance(n, ast.ImportFrom)]
    for node in sorted(imports, key=lambda n: n.lineno):
        if not (node.module or "").startswith("vllm."):
            continue
        relpath = node.module.removeprefix("vllm.").replace(".", "/") + ".py"
        tree = vllm_code.parse(vllm_source(relpath) or "")
        for top in tree.body if tree is not None else ():
            names = [alias.name for alias in top.names] if isinstance(top, ast.Import) else []
            if isinstance(top, ast.ImportFrom) and not top.level and top.module:
                names = [top.module]
            for name in names:
                package = name.split(".")[0]
                if importlib.util.find_spec(package) is None:
                    return package
    return None


def patch_moe_oracle(module: ModuleType) -> None:
    """A backend whose kernel module cannot be imported supports no layer: the oracle
    says so and tries the next one, and raises its no-backend error (which the MoE
    fallbacks catch) where none is left."""

    def make(original: Any) -> Any:
        def backend_to_kernel_cls(backend: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return original(backend, *args, **kwargs)
            except ModuleNotFoundError as exc:
                if envs.fallback_mode() == "off":
                    raise
                return [_unimportable_kernel(f"its kernel module needs {exc.name}: {exc}")]

        return backend_to_kernel_cls

    wrap_once(module, "backend_to_kernel_cls", _MARK, make)


def _unimportable_kernel(reason: str) -> type:
    """A stand-in for the kernel classes of a backend that cannot be imported."""

    class UnimportableNvFp4MoEKernel:
        @staticmethod
        def is_supported_config(cls: type, *args: Any, **kwargs: Any) -> tuple[bool, str]:
            return False, reason

    return UnimportableNvFp4MoEKernel


def patch_ct_moe_factory(module: ModuleType, method_module: str) -> None:
    """``CompressedTensorsMoEMethod.get_moe_method`` (``method_module``: where vLLM's NVFP4
    MoE method lives)."""

    def make(original: Any) -> Any:
        def get_moe_method(quant_config, layer: torch.nn.Module, layer_name: str):  # noqa: ANN001
            try:
                return original(quant_config, layer, layer_name)
            except NotImplementedError as exc:
                if not _falls_back(exc, NO_NVFP4_MOE_KERNEL):
                    raise
                reason = str(exc)
            from .moe import _moe_scheme

            _, input_quant = _moe_scheme(quant_config, layer, layer_name)
            method = dequantized_ct_nvfp4_moe_method_class(method_module)
            return method(layer.moe_config, reason, input_quant is None, layer_name)

        return get_moe_method

    wrap_once(module.CompressedTensorsMoEMethod, "get_moe_method", _MARK, make, static=True)


def _falls_back(exc: Exception, no_kernel: str) -> bool:
    """Whether this error is vLLM's ``no_kernel`` refusal, and the fallback is on."""
    return no_kernel in str(exc) and envs.fallback_mode() != "off"


def _linear_kernel_choice(choice: str) -> Any:
    """A wrapper maker for vLLM's ``choice`` function: the fallback kernel where it
    refuses."""
    no_kernel = _NO_LINEAR[choice]

    def make(original: Any) -> Any:
        def pick(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except ValueError as exc:
                if not _falls_back(exc, no_kernel):
                    raise
            return dequantized_nvfp4_linear_kernel_class()(no_kernel)

        return pick

    return make


@functools.cache
def dequantized_nvfp4_linear_kernel_class() -> type:
    """The NVFP4 linear kernel interface ModelOpt's linear method and compressed-tensors'
    scheme drive (process, apply, the input key fusion asks for), over vLLM's unquantized
    linear method."""
    import torch
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from ... import int4

    class DequantizedNvFp4LinearKernel:
        """NVFP4 linear tensors in, vLLM's unquantized linear out."""

        supports_pre_processed_weights = False

        def __init__(self, reason: str = NO_NVFP4_LINEAR_KERNEL) -> None:
            self.unquantized = UnquantizedLinearMethod()
            self.announced = False
            self.reason = reason  # vLLM's refusal

        def announce(self, layer: torch.nn.Module, *packed: torch.Tensor) -> None:
            """Adds the layer to the model's one warning, before any layer is processed."""
            rows, cols = packed[0].shape
            COST_REPORT.add(
                "linear layers",
                sum(_nbytes(t) for t in packed),
                rows * cols * 2 * layer.params_dtype.itemsize,
                f"{self.reason} (NVFP4 weights dequantized, {_WHY})",
            )
            self.announced = True

        def input_quant_key(self) -> None:
            return None  # activations stay in the model dtype

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            """ModelOpt's tensors, as its linear method hands them over."""
            # vLLM's method has turned weight_scale_2 (one per fused shard) into one
            # weight_global_scale, their maximum, which its own kernels use for every
            # shard; ModelOpt exports one value for shards that share an input
            global_scale = getattr(layer, "weight_global_scale", None)
            if global_scale is None:
                global_scale = layer.weight_scale_2.max()
            weight = int4.dequantize_modelopt_nvfp4(
                layer.weight.data, layer.weight_scale.data, global_scale.data, layer.params_dtype
            )
            if not self.announced:
                self.announce(layer, layer.weight, layer.weight_scale)
            self._install(layer, weight)

        def process_compressed_tensors(self, layer: torch.nn.Module) -> None:
            """compressed-tensors' tensors as loaded: every shard of ``logical_widths`` with
            its own global scale."""
            packed, scale = layer.weight_packed.data, layer.weight_scale.data
            global_scale = layer.weight_global_scale.data.reshape(-1)
            rows = list(pairwise(accumulate(layer.logical_widths, initial=0)))
            if len(rows) != global_scale.numel() or rows[-1][1] != packed.shape[0]:
                raise ValueError(
                    f"weight_packed {tuple(packed.shape)} with weight_global_scale "
                    f"{tuple(global_scale.shape)}: expected one global scale per shard of "
                    f"{layer.logical_widths} rows"
                )
            weight = torch.cat(
                [
                    int4.dequantize_nvfp4(
                        packed[a:b], scale[a:b], global_scale[i : i + 1], dtype=layer.params_dtype
                    )
                    for i, (a, b) in enumerate(rows)
                ]
            )
            self._install(layer, weight)

        def _install(self, layer: torch.nn.Module, weight: torch.Tensor) -> None:
            """``weight`` replaces the NVFP4 tensors; vLLM's unquantized method takes over."""
            COST_REPORT.flush(weight.dtype)
            install_unquantized(layer, weight, _LINEAR_PARAMS, self.unquantized)

        def apply_weights(
            self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            return self.unquantized.apply(layer, x, bias)

    return DequantizedNvFp4LinearKernel


# The NVFP4 linear parameters: ModelOpt's, as loaded and as its method renames them, and
# compressed-tensors'
_LINEAR_PARAMS = (
    "weight",
    "weight_packed",
    "weight_scale",
    "weight_scale_2",
    "weight_global_scale",
    "input_scale",
    "input_global_scale",
    "input_global_scale_inv",
    "alpha",
)


@functools.cache
def _dequantized_moe_method_base() -> type:
    """Built on first use: vLLM's MoE classes are only imported where a layer needs them."""
    import torch
    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import (
        FusedMoEMethodBase,
    )

    class DequantizedNvFp4MoEMethod(UnquantizedFusedMoEMethod):
        """vLLM's NVFP4 expert buffers in (``packed_class.create_weights``), vLLM's
        unquantized MoE out. The FP8 fallback (``fp8.py``) takes the same course."""

        packed_class: type  # vLLM's NVFP4 MoE method
        params: tuple[str, ...]  # the buffers its create_weights registers
        weight = "weight"  # w13_<weight> / w2_<weight>: the packed E2M1 codes
        global_scale = "weight_scale_2"  # [E, shards] (w13) or [E] (w2)
        format_name = "NVFP4"  # in the model's one warning
        packed_dtype = torch.uint8  # the codes as loaded (not dequantized yet)
        values_per_code = 2  # weights per element of the codes
        why = _WHY

        def __init__(self, moe: Any, reason: str, layer_name: str = "") -> None:
            super().__init__(moe)
            self.reason = reason
            self.layer_name = layer_name

        @staticmethod
        def codec(
            weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, dtype: Any
        ) -> torch.Tensor:
            """[E, N, K / 2] codes, [E, N, K / 16] block scales, [E] global scales ->
            [E, N, K] in ``dtype``."""
            raise NotImplementedError

        maybe_roundup_sizes = keep_checkpoint_sizes

        def packed_method(self) -> Any:
            """vLLM's method minus its backend selection (the step that fails): only its
            ``create_weights`` runs, with the attributes that reads."""
            packed = self.packed_class.__new__(self.packed_class)
            FusedMoEMethodBase.__init__(packed, self.moe)
            return packed

        def create_weights(
            self,
            layer: torch.nn.Module,
            num_experts: int,
            hidden_size: int,
            intermediate_size_per_partition: int,
            params_dtype: torch.dtype,
            **extra_weight_attrs: Any,
        ) -> None:
            self.packed_class.create_weights(
                self.packed_method(),
                layer,
                num_experts,
                hidden_size,
                intermediate_size_per_partition,
                params_dtype,
                **extra_weight_attrs,
            )
            self.params_dtype = params_dtype
            codes = self._tensor(layer, "w13", self.weight), self._tensor(layer, "w2", self.weight)
            COST_REPORT.add(
                "MoE layers",
                sum(_nbytes(p) for n, p in layer.named_parameters() if n in self.params),
                self.values_per_code * sum(c.numel() for c in codes) * params_dtype.itemsize,
                f"{self.reason} ({self.format_name} experts: weights dequantized, {self.why})",
                self.layer_name,
            )

        @staticmethod
        def _tensor(layer: torch.nn.Module, stem: str, name: str) -> torch.Tensor:
            return getattr(layer, f"{stem}_{name}").data

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            if self._tensor(layer, "w13", self.weight).dtype == self.packed_dtype:
                COST_REPORT.flush(self.params_dtype)
                weights = {stem: self._dequantize(layer, stem) for stem in ("w13", "w2")}
                install_unquantized_experts(layer, weights, self.params)
            super().process_weights_after_loading(layer)

        def _dequantize(self, layer: torch.nn.Module, stem: str) -> torch.Tensor:
            """[E, N, K]: each shard of rows (w13: gate [0, I) and up [I, 2I)) with its
            own global scale."""
            weight = self._tensor(layer, stem, self.weight)
            scale = self._tensor(layer, stem, "weight_scale")
            global_scale = self._tensor(layer, stem, self.global_scale)
            global_scale = global_scale.reshape(weight.shape[0], -1)
            shards = global_scale.shape[1]
            rows = weight.shape[1] // shards
            return torch.cat(
                [
                    self.codec(
                        weight[:, s * rows : (s + 1) * rows],
                        scale[:, s * rows : (s + 1) * rows],
                        global_scale[:, s],
                        dtype=self.params_dtype,
                    )
                    for s in range(shards)
                ],
                dim=1,
            )

    return DequantizedNvFp4MoEMethod


@functools.cache
def dequantized_nvfp4_moe_method_class() -> type:
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4FusedMoE

    from ... import int4

    class ModelOptNvFp4DequantizedMoEMethod(_dequantized_moe_method_base()):
        """ModelOpt's NVFP4 experts. The experts' weight loader takes ModelOpt's scale
        paths for methods whose class name says "ModelOpt", so this one's does."""

        packed_class = ModelOptNvFp4FusedMoE
        params = _PARAMS
        codec = staticmethod(int4.dequantize_modelopt_nvfp4)

        def __init__(self, quant_config: Any, moe: Any, reason: str) -> None:
            super().__init__(moe, reason)
            self.quant_config = quant_config

        def uses_weight_scale_2_pattern(self) -> bool:
            return True  # the loader maps `weight_scale_2` names as for NVFP4 experts

        def packed_method(self) -> Any:
            packed = super().packed_method()
            packed.quant_config = self.quant_config
            packed.use_global_sf = False  # one input scale per local expert
            return packed

    return ModelOptNvFp4DequantizedMoEMethod


@functools.cache
def dequantized_ct_nvfp4_moe_method_class(method_module: str) -> type:
    from ... import int4

    class CompressedTensorsNvFp4DequantizedMoEMethod(_dequantized_moe_method_base()):
        """compressed-tensors' NVFP4 experts (``weight_packed``, ``weight_scale``,
        ``weight_global_scale`` as a divisor, ``input_global_scale`` unused)."""

        packed_class = getattr(importlib.import_module(method_module), _CT_MOE)
        params = _CT_MOE_PARAMS
        weight = "weight_packed"
        global_scale = "weight_global_scale"
        codec = staticmethod(int4.dequantize_nvfp4)

        def __init__(self, moe: Any, reason: str, use_a16: bool, layer_name: str) -> None:
            super().__init__(moe, reason, layer_name)
            self.use_a16 = use_a16

        def packed_method(self) -> Any:
            packed = super().packed_method()
            packed.group_size = int4.NVFP4_GROUP
            packed.use_a16 = self.use_a16
            return packed

    return CompressedTensorsNvFp4DequantizedMoEMethod
