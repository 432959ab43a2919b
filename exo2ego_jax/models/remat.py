"""Rematerialisation policies by name: one table for the CLIP and Mistral layers.

``remat_policy`` (``config.model.remat_policy``; ``CLIPVisionConfig.remat``,
``MistralConfig.remat_policy``) says what one transformer layer keeps for the backward
pass; everything else is recomputed from the layer input (the scan carry, always kept):

``none``              no remat: keep every activation.
``full``              keep nothing: recompute the whole layer.
``dots``              keep every matmul output, the attention scores of the ``xla`` /
                      ``reference`` kernels included.
``dots_no_batch``     keep matmul outputs without batch dimensions (the weight projections,
                      LoRA's rank-r intermediates too).
``save_qkv``          keep the q / k / v projection outputs (by name, see below).
``save_qkvo``         ... and the attention output projection.
``save_qkvo_mlp``     ... and the MLP projections: every weight projection, nothing else.
``offload_qkv``       as ``save_qkv``, but moved to host memory (``pinned_host``) after the
                      forward pass and back for the backward pass.
``offload_qkvo_mlp``  as ``save_qkvo_mlp``, offloaded to the host.

The named policies rely on the layers tagging their projections with
``jax.ad_checkpoint.checkpoint_name``: :data:`QUERY`, :data:`KEY`, :data:`VALUE`,
:data:`OUT` (attention), :data:`MLP_IN` (Mistral's gate / up, CLIP's fc1) and
:data:`MLP_OUT` (down / fc2), each the whole projection output (LoRA included).

The ``offload_*`` policies need a backend with a ``pinned_host`` memory space
(:func:`host_offload_supported`: TPU, GPU, and XLA:CPU in current JAX);
``config_lib.resolve`` refuses them elsewhere.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

QUERY, KEY, VALUE, OUT = "query_proj", "key_proj", "value_proj", "out_proj"
MLP_IN, MLP_OUT = "mlp_in", "mlp_out"

_QKV = (QUERY, KEY, VALUE)
_QKVO = (*_QKV, OUT)
_QKVO_MLP = (*_QKVO, MLP_IN, MLP_OUT)


def _save(*names: str):
    return jax.checkpoint_policies.save_only_these_names(*names)


def _offload(*names: str):
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=names,
        offload_src="device",
        offload_dst="pinned_host",
    )


# name -> (policy factory, offloads to host)
_TABLE: dict[str, tuple[Any, bool]] = {
    "none": (None, False),
    "full": (lambda: jax.checkpoint_policies.nothing_saveable, False),
    "dots": (lambda: jax.checkpoint_policies.checkpoint_dots, False),
    "dots_no_batch": (lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable, False),
    "save_qkv": (lambda: _save(*_QKV), False),
    "save_qkvo": (lambda: _save(*_QKVO), False),
    "save_qkvo_mlp": (lambda: _save(*_QKVO_MLP), False),
    "offload_qkv": (lambda: _offload(*_QKV), True),
    "offload_qkvo_mlp": (lambda: _offload(*_QKVO_MLP), True),
}

#: Every valid ``remat_policy`` name (the memory planner's ``--remat`` reads this too).
REMAT_POLICIES: tuple[str, ...] = tuple(_TABLE)


def check_policy(name: str, field: str = "remat_policy") -> None:
    """Raises ``ValueError`` naming ``field`` and the valid names if ``name`` is unknown."""
    if name not in _TABLE:
        raise ValueError(f"{field}={name!r} is not one of {', '.join(REMAT_POLICIES)}")


def offloads(name: str) -> bool:
    """True for the policies that move residuals to host memory."""
    check_policy(name)
    return _TABLE[name][1]


def host_offload_supported(device: jax.Device | None = None) -> bool:
    """Whether ``device`` (default: the first device) has a ``pinned_host`` memory space."""
    device = device or jax.devices()[0]
    try:
        return any(m.kind == "pinned_host" for m in device.addressable_memories())
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return False


def remat_layer(layer_cls: type[nn.Module], name: str, **kwargs: Any) -> type[nn.Module]:
    """``layer_cls`` under ``nn.remat`` with the named policy (``layer_cls`` itself for
    ``"none"``). ``kwargs`` go to ``nn.remat`` (``prevent_cse``, ``static_argnums``)."""
    check_policy(name)
    if name == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=_TABLE[name][0](), **kwargs)
