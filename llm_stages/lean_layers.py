"""Memory-lean layers (`model.lean_activations`): a model's RMSNorms, gated MLPs and attention masks
computed with fewer activations kept for the backward pass, the same numbers up to float rounding.

At long context the activations kept for the backward pass, not the weights, fill the memory: per token
and decoder layer, autograd keeps the gated MLP's gate and up projections, the activation's output and
their product (4 × intermediate size), and for each RMSNorm its input, the normalised input and the
output. The functions here keep only what the backward pass cannot cheaply recompute:

- gated MLP, `down(act(gate(x)) * up(x))`: x, gate(x) and up(x); `act(gate)` and the product are
  recomputed in the backward pass (two elementwise passes), which saves 2 × intermediate size per
  token and layer — for SmolLM2 12 KB per token and layer in fp32;
- RMSNorm, `weight * (x * rsqrt(mean(x²) + eps))`: x and the reciprocal RMS (one number per token);
  the normalised input is recomputed, saving 1 × hidden size per norm;
- an RMSNorm's output inside a decoder layer, which the next projections (q/k/v, the MLP) keep as their
  input: recomputed from the norm's x and reciprocal RMS, which the norm keeps anyway (one elementwise
  pass per use), saving another 1 × hidden size per norm. A decoder layer's forward runs under
  saved-tensor hooks that recognise its norms' outputs; every other tensor goes to the hooks already in
  place, if any (CPU offloading, say). Under gradient checkpointing the layer is recomputed anyway and
  its forward is left as it is.

Liger-Kernel does the same with Triton kernels on CUDA; these are plain PyTorch and run anywhere. A module
is switched only where its class computes exactly this: each class is checked once against its own
forward on a random input (so a Gemma RMSNorm, which scales by 1 + weight, or an MLP of another structure
keeps its own forward). Projections that are LoRA-wrapped or quantised, and any forward without autograd
(generation, references), run the module's own forward.

Attention masks: transformers builds one boolean mask per forward pass for all layers, and torch's SDPA
turns a boolean mask into a float one (0 / -inf) on every call, which each layer then keeps for its
backward pass — at 2 × 2,048 tokens, 34 MB per layer. Each boolean mask is converted once instead (the
same float mask SDPA would make), so the layers share one.

On a machine without CUDA, grouped-query attention also stops copying each key/value head for every
query head it serves (`TRANSFORMERS_SDPA_FORCE_GQA`): transformers makes those copies whenever there is
an attention mask, because CUDA's fast SDPA kernels need them, and keeps them for the backward pass;
torch's CPU kernel takes the groups as they are, with the same result.
"""

from __future__ import annotations

import logging
import os
import threading
import types
import weakref
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

LEAN_ATTRIBUTE = "_llm_stages_lean"
GQA_WITHOUT_COPIES = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' sdpa_attention_forward on each call


class _RMSNorm(torch.autograd.Function):
    """`weight * (x.float() * rsqrt(mean(x.float()²) + eps)).to(x.dtype)`, keeping x and the
    reciprocal RMS for the backward pass (HF's Llama/Qwen2/Mistral RMSNorm). Returns the output and the
    reciprocal RMS (not differentiable), from which `_normed` recomputes the output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return _normed(x, weight, rstd), rstd

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_normed = (grad * weight).float()
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)), per row.
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


def _normed(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The RMSNorm's output: the same operations in the same order each time, so a recomputation gives
    the same bits."""
    normed = (x.float() * rstd).to(x.dtype)
    if normed.dtype == weight.dtype:  # normed is a new tensor in x's dtype (x * rstd made it)
        return normed.mul_(weight)  # in place where the dtypes allow: one hidden-sized temporary fewer
    return weight * normed


class _GatedMLP(torch.autograd.Function):
    """`down(act(gate(x)) * up(x))` for bias-free linear projections, keeping x, gate(x) and up(x); the
    activation and the product are recomputed in the backward pass. `act` is the module's own activation
    (any elementwise function): its derivative is taken by autograd on the recomputed gate."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, act):
        gate, up = x @ w_gate.T, x @ w_up.T
        ctx.act = act
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        hidden = act(gate)
        hidden.mul_(up)  # in place: one intermediate-sized temporary, not two
        return hidden @ w_down.T

    @staticmethod
    def backward(ctx, grad):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        with torch.enable_grad():
            gate_ = gate.detach().requires_grad_()
            activated = ctx.act(gate_)
        hidden = activated.detach() * up
        grad_hidden = grad @ w_down
        grad_up = grad_hidden * activated.detach()
        (grad_gate,) = torch.autograd.grad(activated, gate_, grad_hidden * up)
        flat_x = x.reshape(-1, x.shape[-1])
        grad_x = grad_gate @ w_gate + grad_up @ w_up if ctx.needs_input_grad[0] else None
        grad_w_gate = grad_gate.reshape(-1, gate.shape[-1]).T @ flat_x if ctx.needs_input_grad[1] else None
        grad_w_up = grad_up.reshape(-1, up.shape[-1]).T @ flat_x if ctx.needs_input_grad[2] else None
        grad_w_down = (grad.reshape(-1, grad.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1])
                       if ctx.needs_input_grad[3] else None)
        return grad_x, grad_w_gate, grad_w_up, grad_w_down, None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def lean_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # nothing is kept without autograd: generation runs the module's own
        return type(self).forward(self, hidden_states)
    output, rstd = _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    layer = getattr(_IN_LAYER, "outputs", None)
    if layer is not None and not hasattr(self.weight, "ds_id"):  # ZeRO-3 gathers the weight only in its own forward
        layer.add(output, hidden_states, self.weight, rstd)
    return output


def _plain_projections(mlp: nn.Module) -> bool:
    """gate/up/down are plain bias-free linears whose weights this forward may read: not wrapped since
    (LoRA, quantisation), not partitioned by DeepSpeed ZeRO-3 (which gathers a weight only when its own
    module runs)."""
    projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return all(type(p) is nn.Linear and p.bias is None and not hasattr(p.weight, "ds_id") for p in projections)


def lean_gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled() or not _plain_projections(self):  # nothing to keep, or not plain linears
        return type(self).forward(self, x)
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    tensors = [x, *(p.weight for p in projections)]
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:  # as autocast runs the three linears: inputs and weights in its dtype
        tensors = [t.to(dtype) for t in tensors]
    with torch.autocast(x.device.type, enabled=False):
        return _GatedMLP.apply(*tensors, self.act_fn)


_IN_LAYER = threading.local()  # .outputs: the NormOutputs of the decoder layer whose forward is running


@dataclass
class _NormRecipe:
    """What recomputes one norm output: its input and reciprocal RMS (as the hooks outside packed them)."""
    x: object
    weight: torch.Tensor
    rstd: object
    outer_unpack: object
    unpacked: tuple | None = None  # x and rstd once unpacked: hooks outside (checkpointing) unpack each only once

    def output(self) -> torch.Tensor:
        if self.unpacked is None:
            unpack = self.outer_unpack or (lambda t: t)
            self.unpacked = (unpack(self.x), unpack(self.rstd))
        return _normed(self.unpacked[0], self.weight, self.unpacked[1])


@dataclass
class _NormView:
    """A saved tensor that is (a view of) a norm output: recomputed when the backward pass asks for it."""
    recipe: _NormRecipe
    size: torch.Size
    stride: tuple[int, ...]
    offset: int

    def tensor(self) -> torch.Tensor:
        return self.recipe.output().as_strided(self.size, self.stride, self.offset)


class NormOutputs:
    """Saved-tensor hooks for one decoder layer's forward: a saved tensor that shares its storage with one
    of the layer's lean norm outputs (unchanged since) is kept as a recipe, not as a tensor; every other
    tensor goes to the hooks that were in place, or is kept as it is."""

    def __init__(self, outer: tuple | None):
        self._outer_pack, self._outer_unpack = outer or (None, None)
        self._by_storage: dict[int, list] = {}  # data_ptr -> [output, its version, x, weight, rstd, recipe]

    def add(self, output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> None:
        if output.is_contiguous() and output.storage_offset() == 0:
            self._by_storage[output.untyped_storage().data_ptr()] = [output, output._version, x, weight, rstd, None]

    def close(self) -> None:
        """The layer's forward is over: nothing more is saved, and the outputs must not be kept from here."""
        self._by_storage = {}

    def pack(self, t: torch.Tensor):
        entry = self._by_storage.get(_storage_pointer(t)) if self._by_storage else None
        if entry is None or entry[0]._version != entry[1] or t.dtype != entry[0].dtype:
            return self._outer_pack(t) if self._outer_pack else t
        if entry[5] is None:  # x and rstd go where the layer's other saved tensors go
            pack = self._outer_pack or (lambda u: u)
            entry[5] = _NormRecipe(pack(entry[2]), entry[3], pack(entry[4]), self._outer_unpack)
        return _NormView(entry[5], t.size(), t.stride(), t.storage_offset())

    def unpack(self, packed):
        if isinstance(packed, _NormView):
            return packed.tensor()
        return self._outer_unpack(packed) if self._outer_unpack else packed


def _storage_pointer(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (subclasses, meta)
        return None


# torch's own accessors (what torch.utils.checkpoint builds on): the hooks in place, and whether hooks may be
# set at all (not while torch.compile traces). Where a torch lacks them, the layers keep their own forward.
_HOOKS_IN_PLACE = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_HOOKS_ALLOWED = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)


def lean_decoder_layer_forward(self, *args, **kwargs):
    """The layer's own forward, with its norm outputs kept as recipes (see NormOutputs)."""
    own = type(self).forward
    checkpointed = getattr(self, "gradient_checkpointing", False) and self.training
    if (not torch.is_grad_enabled() or checkpointed or _HOOKS_IN_PLACE is None or _HOOKS_ALLOWED is None
            or not _HOOKS_ALLOWED()):
        return own(self, *args, **kwargs)
    outputs = NormOutputs(_HOOKS_IN_PLACE(False))
    previous, _IN_LAYER.outputs = getattr(_IN_LAYER, "outputs", None), outputs
    try:
        with torch.autograd.graph.saved_tensors_hooks(outputs.pack, outputs.unpack):
            return own(self, *args, **kwargs)
    finally:
        _IN_LAYER.outputs = previous
        outputs.close()  # the hooks' unpack stays referenced by the graph: it must not hold the outputs


class OneFloatMask:
    """A forward pre-hook for attention modules: a boolean attention mask replaced by the float mask torch's
    SDPA would make of it (0 where attended, -inf elsewhere, in the query's dtype), made once per boolean
    mask, so every layer of a forward pass shares it (see the module docstring)."""

    def __init__(self):
        self._float_of: dict[int, tuple[weakref.ref, torch.dtype, torch.Tensor]] = {}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dtype != torch.bool or getattr(module.config, "_attn_implementation", None) != "sdpa":
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None:
            return None
        # The query's dtype: the projection's output, in autocast's dtype under autocast.
        dtype = _autocast_dtype(mask.device.type) or hidden.dtype
        self._float_of = {k: v for k, v in self._float_of.items() if v[0]() is not None}  # masks gone since
        known = self._float_of.get(id(mask))
        if known is None or known[0]() is not mask or known[1] != dtype:
            converted = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            known = self._float_of[id(mask)] = (weakref.ref(mask), dtype, converted)
        return args, {**kwargs, "attention_mask": known[2]}


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and hasattr(getattr(module, "config", None),
                                                                      "_attn_implementation")


def _is_rms_norm(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)
            and module.weight.dim() == 1 and isinstance(getattr(module, "variance_epsilon", None), float))


def _is_gated_mlp(module: nn.Module) -> bool:
    named = all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    return named and _plain_projections(module) and callable(module.act_fn)


def _same_as_own_forward(module: nn.Module, lean_forward, width: int) -> bool:
    """Whether `lean_forward` gives the module's own output and input gradient on a random input."""
    weight = next(module.parameters())
    if weight.is_meta:  # nothing to compute with: not switched
        return False
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0), device="cpu").to(weight)
    own_x, lean_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    try:
        own, lean = type(module).forward(module, own_x), lean_forward(module, lean_x)
        (own.square().sum()).backward(inputs=[own_x])
        (lean.square().sum()).backward(inputs=[lean_x])
    except Exception as e:  # noqa: BLE001 - any failure means: keep the module's own forward
        log.debug("lean %s not used: %s", type(module).__name__, e)
        return False
    tolerance = dict(rtol=1e-4, atol=1e-5) if weight.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    return own.shape == lean.shape and torch.allclose(own, lean, **tolerance) \
        and torch.allclose(own_x.grad, lean_x.grad, **tolerance)


def grouped_query_attention_without_copies() -> bool:
    """On a machine without CUDA, have transformers' SDPA attention pass grouped key/value heads to torch
    as they are (see the module docstring). Returns whether it does; a value the user set is kept."""
    if torch.cuda.is_available() or GQA_WITHOUT_COPIES in os.environ:
        return os.environ.get(GQA_WITHOUT_COPIES) == "1"
    os.environ[GQA_WITHOUT_COPIES] = "1"
    return True


def make_lean(model: nn.Module) -> dict[str, int]:
    """Switch every RMSNorm and gated MLP of `model` that computes exactly what the lean functions do to
    them, give every attention module the one-float-mask hook, and have every decoder layer with a lean
    norm recompute its norm outputs (see the module docstring). Returns how
    many modules of each class were switched; classes that failed their check are logged and keep their
    own forward."""
    checked: dict[type, bool] = {}
    switched: dict[str, int] = {}
    one_float_mask = OneFloatMask()
    for module in model.modules():
        if _is_attention(module) and not getattr(module, LEAN_ATTRIBUTE, False):
            module.register_forward_pre_hook(one_float_mask, with_kwargs=True)
            setattr(module, LEAN_ATTRIBUTE, True)
            switched[type(module).__name__] = switched.get(type(module).__name__, 0) + 1
            continue
        if _is_rms_norm(module):
            lean_forward, width = lean_rms_norm_forward, module.weight.shape[0]
        elif _is_gated_mlp(module):
            lean_forward, width = lean_gated_mlp_forward, module.gate_proj.in_features
        else:
            continue
        cls = type(module)
        if cls not in checked:
            with torch.random.fork_rng(devices=[]):
                checked[cls] = _same_as_own_forward(module, lean_forward, width)
            if not checked[cls]:
                log.info("model.lean_activations: %s computes something else; it keeps its own forward",
                         cls.__name__)
        if checked[cls]:
            module.forward = types.MethodType(lean_forward, module)
            setattr(module, LEAN_ATTRIBUTE, True)
            switched[cls.__name__] = switched.get(cls.__name__, 0) + 1
    for module in model.modules():  # decoder layers: an attention and a lean norm among their children
        children = list(module.children())
        if (not getattr(module, LEAN_ATTRIBUTE, False) and any(_is_attention(c) for c in children)
                and any(_is_rms_norm(c) and getattr(c, LEAN_ATTRIBUTE, False) for c in children)):
            module.forward = types.MethodType(lean_decoder_layer_forward, module)
            setattr(module, LEAN_ATTRIBUTE, True)
            switched[type(module).__name__] = switched.get(type(module).__name__, 0) + 1
    return switched
