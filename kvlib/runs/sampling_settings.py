"""Sampling settings as a model's card recommends them, read from its ``generation_config``.

Thinking models are not meant to be decoded greedily: Qwen3's card asks for temperature 0.6, top-p 0.95
and top-k 20 in thinking mode (greedy thinking falls into endless repetition), and ships those values
in ``generation_config.json``. :func:`sampling_from_generation_config` turns such a config into the
:class:`~kvlib.runs.generation.GenerationSettings` of a run, so the settings a record was made with are the
ones the store identity names. Each item is still seeded on its own (see :func:`kvlib.core.decoding.decode`):
a batch samples exactly what its items sample one at a time.

Only ``do_sample``, ``temperature``, ``top_k`` and ``top_p`` are read; a value the config leaves unset
takes the default ``model.generate`` applies (temperature 1, top-k 50, top-p 1), so the run samples as
``generate`` would. Other filters (``min_p``, repetition penalties) are not implemented by the decoding
loop, and a config that turns one on is refused rather than silently ignored.
"""

from __future__ import annotations

from .generation import GenerationSettings, decode_config

__all__ = ["sampling_from_generation_config", "GENERATE_DEFAULTS"]

# what ``model.generate`` uses for a sampling value the generation config leaves unset
GENERATE_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}

# filters the decoding loop does not implement, and the value that leaves each of them off
_UNSUPPORTED = {"min_p": (None, 0.0), "typical_p": (None, 1.0), "repetition_penalty": (None, 1.0),
                "no_repeat_ngram_size": (None, 0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0)}


def sampling_from_generation_config(generation_config, max_new_tokens: int, seed: int = 0) -> GenerationSettings:
    """The generation settings a model's ``generation_config`` asks for.

    Args:
        generation_config: a ``transformers.GenerationConfig`` (``model.generation_config``) or any object
            with ``do_sample`` / ``temperature`` / ``top_k`` / ``top_p`` attributes; a missing or ``None``
            value takes ``generate``'s default (:data:`GENERATE_DEFAULTS`); ``top_k=0`` turns top-k off.
        max_new_tokens: the answer budget of the run.
        seed: base seed of the run (each item's seed derives from it and the item id).

    Returns:
        Greedy settings when ``do_sample`` is false (the sampling values are then irrelevant and left at
        their defaults, so every greedy run shares one store identity); else the sampling values.

    Raises:
        ValueError: the config turns on a filter the decoding loop does not implement (e.g. ``min_p``), or its
            values cannot be sampled with (e.g. temperature 0 with ``do_sample``).
    """
    def get(name, default):
        value = getattr(generation_config, name, None)
        return default if value is None else value

    if not bool(get("do_sample", False)):
        return GenerationSettings(max_new_tokens=max_new_tokens, seed=seed)
    on = {k: get(k, None) for k in _UNSUPPORTED if get(k, None) not in _UNSUPPORTED[k]}
    if on:
        raise ValueError(f"the generation config turns on {on}, which kvlib's decoding loop does not implement; "
                         "set them to their neutral values on a copy of the config to sample without them")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=True, seed=seed,
                                  temperature=float(get("temperature", GENERATE_DEFAULTS["temperature"])),
                                  top_k=int(get("top_k", GENERATE_DEFAULTS["top_k"])),
                                  top_p=float(get("top_p", GENERATE_DEFAULTS["top_p"])))
    decode_config(settings)  # validates the values now, not at the first batch
    return settings
