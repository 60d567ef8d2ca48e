"""Hugging Face transformers integration: our kernels as the ``triton_fa`` attention
implementation.

Importing ``flashattn_modules`` calls :func:`register` when transformers >= 5.4 is installed,
so ``from_pretrained(..., attn_implementation="triton_fa")`` and
``model.set_attn_implementation("triton_fa")`` work; :func:`patch_hf_model` switches a loaded
model in place and can be undone. (The name has no "flash" in it: transformers routes every
such name to its flash-attn loader.)

What a call computes, for ``fn(module, query, key, value, attention_mask, scaling=...,
dropout=..., **kwargs)`` with query (B, H, Sq, D) and key/value (B, Hkv, Sk, D):

- The mask is built by transformers' own SDPA mask builder (``masking_utils.sdpa_mask``,
  registered unchanged under ``triton_fa``), so every model-specific pattern (padding,
  causal, sliding and chunked windows, packed sequences, static-cache slots) arrives as a
  bool (B, 1, Sq, Sk) tensor. **With a mask, the mask decides**: no causal flag or window
  is added on top of it (a cache may hold its keys out of order); softcap and scaling apply.
- Without a mask (the builder found it unnecessary): causal when the ``is_causal`` kwarg, or
  else ``module.is_causal`` (default True, as SDPA), says so and Sq > 1. A causal call with
  Sk > Sq (prefill on an empty StaticCache) attends to the first Sq keys only, as SDPA's
  top-left ``is_causal`` does. Sq = 1 is not causal: the row sees the whole cache (within
  the sliding window, if any). ``sliding_window`` (transformers counts the whole window)
  becomes ``window_size=(sliding_window - 1, 0)`` on causal layers and
  ``(sliding_window, sliding_window)`` on bidirectional ones, as transformers' mask builders
  define them.
- GQA/MQA: K/V are read in place, never repeated.
- Keyword arguments that would change the result and that the kernels do not model
  (``s_aux``, ``position_bias``, a paged ``cache``, anything not known to be harmless)
  raise a ValueError naming them, as do attention dropout > 0 and ``output_attentions``
  (seen in the kwargs or the layer's config; a model that swallows the flag before its
  layers, as GPT-2 does, returns no attentions, as it does with SDPA).
- CUDA tensors run the kernel that :class:`kernels.BackendSelector`'s rule picks for the
  shape (decode included), on (B, S, H, D) views, so the output comes out in the
  (B, Sq, H, D) layout the model wants without a copy. No host synchronisation and no
  data-dependent branch, for ``torch.compile`` and CUDA graphs. CPU tensors follow the
  modules' CPU policy (``flashattn_modules._dispatch``, ``FLASHATTN_CPU_BACKEND``).
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from typing import Any

import torch

from kernels.api import attention as kernel_attention

from . import _dispatch

ATTN_IMPLEMENTATION = "triton_fa"
MIN_TRANSFORMERS = (5, 4)

# Keyword arguments that transformers models pass to attention functions and that do not
# change the result given query, key, value and the mask: the mask builder has already used
# position_ids (packed sequences) and the cache has already been updated.
_HARMLESS_KWARGS = frozenset({
    "position_ids", "use_cache", "cache_position", "past_key_values", "position_embeddings",
    "encoder_hidden_states", "output_hidden_states", "output_router_logits", "return_dict",
    "num_items_in_batch", "seq_idx", "max_length_q", "max_length_k", "deterministic",
})
# Handled below: present in the signature or read from kwargs.
_HANDLED_KWARGS = frozenset({
    "is_causal", "sliding_window", "softcap", "output_attentions", "cu_seq_lens_q",
    "cu_seq_lens_k",
})
_KNOWN_KWARGS = _HARMLESS_KWARGS | _HANDLED_KWARGS


# ----------------------------------------------------------------------------- attention

def triton_fa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None,
                        scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface`` signature) on our kernels.

    Args:
        module: the calling attention layer (``is_causal``, ``config`` are read from it).
        query: (B, H, Sq, D); key, value: (B, Hkv, Sk, D) after the cache update, H % Hkv == 0.
        attention_mask: None or a 4-D mask broadcastable to (B, H, Sq, Sk), bool (True = take
            part) or floating (added to the scores), as transformers' SDPA builder makes it.
        scaling: softmax scale; None means 1 / sqrt(D).
        dropout: must be 0 (the kernels have no attention dropout).
        **kwargs: ``is_causal``, ``sliding_window``, ``softcap`` and harmless bookkeeping
            kwargs; anything else that is not None raises (see the module docstring).

    Returns:
        (attn_output (B, Sq, H, D) in query's dtype, None): no attention weights.
    """
    _check_call(module, query, attention_mask, dropout, kwargs)
    layer_causal = kwargs.get("is_causal")
    if layer_causal is None:
        layer_causal = getattr(module, "is_causal", True)
    seqlen_q = query.shape[2]
    # Plain ``if``s on shapes, so that causal stays a bool under torch.compile's dynamic shapes
    causal, window = False, (-1, -1)
    if attention_mask is None:
        if layer_causal and seqlen_q > 1:
            causal = True
        if causal and key.shape[2] > seqlen_q:  # empty-StaticCache prefill: SDPA's top-left
            key, value = key[:, :, :seqlen_q], value[:, :, :seqlen_q]
        sliding_window = kwargs.get("sliding_window")
        if sliding_window is not None:
            window = ((sliding_window - 1, 0) if layer_causal
                      else (sliding_window, sliding_window))
    softcap = kwargs.get("softcap") or 0.0
    if query.is_cuda:
        # BHSD in, the (B, Sq, H, D) output transformers wants written directly; "auto" is
        # BackendSelector's rule (kernels.selector.choose_variant)
        out = kernel_attention(query, key, value, layout="bhsd", out_bshd=True, variant="auto",
                               causal=causal,
                               softmax_scale=scaling, return_lse=False,
                               attn_mask=attention_mask, window_size=window, softcap=softcap,
                               alibi_slopes=None)
        return out, None
    out = _dispatch.attention(query, key, value, causal=causal, softmax_scale=scaling,
                              attn_mask=attention_mask, window_size=window, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def _check_call(module: torch.nn.Module, query: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float,
                kwargs: dict[str, Any]) -> None:
    """Refuse what the kernels would compute differently from the model's intent (shape and
    kwarg checks only: no host synchronisation)."""
    layer = type(module).__name__
    unknown = [name for name in kwargs if name not in _KNOWN_KWARGS and kwargs[name] is not None]
    if unknown:
        raise ValueError(
            f"{ATTN_IMPLEMENTATION} attention cannot honour keyword argument(s) "
            f"{sorted(unknown)} passed by {layer}: they change the attention result (e.g. "
            f"attention sinks, position biases, paged caches, sparse indices) and the kernels "
            f"do not model them. Use attn_implementation='sdpa' or 'eager' for this model.")
    if dropout:
        raise ValueError(
            f"{layer} asks for attention dropout p={dropout} (training mode with attention "
            f"dropout in the config), but {ATTN_IMPLEMENTATION} has no attention dropout: set "
            f"the config's attention dropout to 0.0, call model.eval(), or train with "
            f"attn_implementation='sdpa'.")
    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        output_attentions = _config_output_attentions(module)
    if output_attentions:
        raise ValueError(
            f"output_attentions=True: {ATTN_IMPLEMENTATION} never materialises attention "
            f"weights. Use attn_implementation='eager' (e.g. model.set_attn_implementation("
            f"'eager'), or exit patch_hf_model) to get them.")
    if attention_mask is not None and attention_mask.dim() != 4:
        raise ValueError(
            f"{layer} passed a {attention_mask.dim()}-D attention_mask of shape "
            f"{tuple(attention_mask.shape)}; {ATTN_IMPLEMENTATION} takes a 4-D mask "
            f"broadcastable to (batch, heads, q_len, kv_len), as transformers' SDPA mask "
            f"builder makes it.")
    if attention_mask is None:
        for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
            cu = kwargs.get(name)
            if cu is not None and cu.shape[0] - 1 > query.shape[0]:
                raise ValueError(
                    f"{name} describes {cu.shape[0] - 1} packed sequences in a batch of "
                    f"{query.shape[0]} row(s), but no attention mask separates them. Pass "
                    f"position_ids that restart at 0 for each packed sequence (transformers "
                    f"then builds the mask), or use a flash_attention_* implementation.")


def _config_output_attentions(module: torch.nn.Module) -> bool:
    """The layer's ``config.output_attentions`` (False without a config). transformers 5
    keeps it behind a property of a config class whose ``__getattribute__`` is written in
    Python: reading it that way costs about 2.8 us on our CPU host, more than the rest of a
    decode call's checks, at every layer of every step. Its storage, ``_output_attentions``
    in the instance dict, is read directly when it is there (0.2 us); torch.compile, which
    cannot trace that read and pays nothing for the property in its graph, takes the
    attribute."""
    config = getattr(module, "config", None)
    if not torch.compiler.is_compiling():
        try:
            return bool(object.__getattribute__(config, "__dict__")["_output_attentions"])
        except (AttributeError, KeyError):  # no config, or another config class
            pass
    return bool(getattr(config, "output_attentions", False))


# ----------------------------------------------------------------------------- registration

def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise RuntimeError(f"cannot read the transformers version {version!r}")
    return int(match.group(1)), int(match.group(2))


def _require_transformers(version: str) -> None:
    if _version_tuple(version) < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise RuntimeError(
            f"the {ATTN_IMPLEMENTATION} attention implementation needs transformers >= {need}, "
            f"found {version}: pip install 'flashattn-modules[hf]' (or 'transformers>={need}')")


def _refuse_kernels_name_clash() -> None:
    """Hugging Face's ``kernels`` package (a dependency of transformers >= 5.25, an extra of
    earlier releases) has the import name of this project's ``kernels`` package. Where
    transformers would import it (installed, in the version range transformers accepts),
    it would get ours and fail with a stranger error: say so first."""
    from transformers.utils import import_utils

    if not getattr(import_utils, "is_kernels_available", lambda: False)():
        return
    raise ImportError(
        f"Hugging Face's 'kernels' package ({importlib.metadata.version('kernels')}) is "
        f"installed; its import name is the same as flashattn-modules' own 'kernels' "
        f"package, so transformers cannot import it (or ours is hidden). Use transformers "
        f"< 5.25, which does not require it: pip uninstall -y kernels && pip install "
        f"'flashattn-modules[hf]'")


def register() -> None:
    """Register :func:`triton_fa_attention` and transformers' SDPA mask builder as the
    ``triton_fa`` attention implementation (idempotent; importing ``flashattn_modules`` does
    it when transformers >= 5.4 is installed).

    Raises:
        ImportError: transformers is not installed, or Hugging Face's ``kernels`` package is
            (its import name clashes with ours).
        RuntimeError: transformers is older than 5.4.
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"the {ATTN_IMPLEMENTATION} attention implementation needs transformers: pip "
            f"install 'flashattn-modules[hf]'") from exc
    _require_transformers(transformers.__version__)
    _refuse_kernels_name_clash()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, triton_fa_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def register_if_available() -> None:
    """What importing ``flashattn_modules`` does: :func:`register` when transformers >= 5.4
    is installed, nothing when it is absent or older (transformers is an optional extra;
    :func:`register` and :func:`patch_hf_model` then say what is missing). A transformers
    that is installed but fails to import gives a warning, not an import error."""
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return
    if _version_tuple(version) < MIN_TRANSFORMERS:
        return
    try:
        register()
    except ImportError as exc:
        warnings.warn(f"{ATTN_IMPLEMENTATION} was not registered with transformers "
                      f"{version}: importing it failed ({exc})", RuntimeWarning, stacklevel=2)


# ----------------------------------------------------------------------------- patching

_HANDLE_ATTR = "_flashattn_hf_patch"


class HFPatch:
    """What :func:`patch_hf_model` returns: restores the model's previous attention
    implementation with :meth:`restore` or on leaving a ``with`` block (which yields the
    model). Restoring twice, or after :func:`unpatch_hf_model`, does nothing."""

    def __init__(self, model: torch.nn.Module, previous: list[tuple[Any, Any]]) -> None:
        self.model = model
        self._previous = previous

    @property
    def active(self) -> bool:
        """Whether the model is still patched by this handle."""
        return getattr(self.model, _HANDLE_ATTR, None) is self

    def restore(self) -> None:
        """Put back every config's attention implementation as it was before patching."""
        if not self.active:
            return
        for config, implementation in self._previous:
            config._attn_implementation_internal = implementation
        delattr(self.model, _HANDLE_ATTR)

    def __enter__(self) -> torch.nn.Module:
        return self.model

    def __exit__(self, *exc_info: object) -> None:
        self.restore()


def _configs(model: torch.nn.Module) -> list[Any]:
    """Every config whose attention implementation set_attn_implementation may change: the
    model's, its sub-configs at any depth, and those of nested pretrained models."""
    from transformers import PreTrainedModel

    found: dict[int, Any] = {}
    pending = [sub.config for sub in model.modules() if isinstance(sub, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found:
            continue
        found[id(config)] = config
        pending.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}))
    return list(found.values())


def patch_hf_model(model: torch.nn.Module) -> HFPatch:
    """Switch an already loaded transformers model (and its sub-models) to ``triton_fa`` in
    place.

    Returns:
        an :class:`HFPatch` handle: ``handle.restore()``, :func:`unpatch_hf_model` or leaving
        ``with patch_hf_model(model) as model: ...`` restores the previous implementation of
        every config exactly.

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        RuntimeError: the model, or a sub-model, does not route its attention through
            transformers' ``AttentionInterface`` (its class is named), or it is already
            patched; transformers missing or older than 5.4.
    """
    register()
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch_hf_model needs a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise RuntimeError(f"{type(model).__name__} is already patched by patch_hf_model; "
                           f"unpatch_hf_model(model) first")
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel) and not type(sub)._can_set_attn_implementation():
            raise RuntimeError(
                f"{type(sub).__name__} does not route its attention through transformers' "
                f"AttentionInterface, so it cannot run {ATTN_IMPLEMENTATION}")
    previous = [(config, config._attn_implementation_internal) for config in _configs(model)]
    handle = HFPatch(model, previous)
    setattr(model, _HANDLE_ATTR, handle)
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except BaseException:
        handle.restore()
        raise
    return handle


def unpatch_hf_model(model: torch.nn.Module) -> None:
    """Restore the attention implementation ``model`` had before :func:`patch_hf_model`.

    Raises:
        ValueError: the model is not currently patched by :func:`patch_hf_model`.
    """
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by patch_hf_model")
    handle.restore()
