"""The pieces of ``python -m latte.sample``: where weights and config come from (``weights``), generating
latents (``generate``, ``long_video``), which VAE decodes them with which scaling factor (``decoding``),
splitting samples among ranks (``ranks``) and writing videos (``media``)."""
