"""External weights in and out: Hugging Face CLIP / Mistral, the VideoLLaMA2 projector, and
the converted checkpoint written by ``tools.convert``, the parts ``tools.export`` writes.

=====================  =================================================================
``errors``             :class:`CheckpointError`, the one error every reader raises
``safetensors_format`` the safetensors container: header parsing and checks, the writer
``tensors``            :class:`TensorSource`, the one reader (safetensors file / sharded
                       directory / PyTorch ``.bin``)
``hf_config``          ``config.json`` reading and field checks
``param_map``          :class:`ParamMapping`, the one mapping-table idiom, and the generic
                       read / write loops over a table
``hf_clip``            HF CLIP vision tower <-> ``CLIPVisionTower``
``hf_mistral``         HF ``MistralForCausalLM`` <-> ``MistralLM``
``mm_projector``       VideoLLaMA2 ``mm_projector`` <-> ``STCConnector``
``peft_adapter``       ``MistralLM``'s LoRA adapters <-> a Hugging Face PEFT adapter
``mapping_net``        the mapping networks F / G <-> safetensors + the JSON of their config
``converted``          restoring a ``tools.convert`` checkpoint into sharded arrays
``hf``                 the public HF entry points (load / save CLIP and Mistral)
=====================  =================================================================

Orbax checkpoints of training stages are elsewhere (``exo2ego_jax.training.checkpoints``).
"""
