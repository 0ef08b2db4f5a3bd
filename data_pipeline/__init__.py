"""Offline and streaming data for Latte: videos -> VAE latents -> shards -> training batches.

Never imports the model (``latte.models``) or DeepSpeed.
"""
