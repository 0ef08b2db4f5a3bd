"""LatteT2V: text-to-video Latte (Latte-1) with PixArt-alpha conditioning, as a pure nn.Module.

Spatial and temporal blocks alternate, as in ``Latte``, but they come in named pairs
(``transformer_blocks[i]`` spatial, ``temporal_transformer_blocks[i]`` temporal) and are conditioned as
PixArt-alpha is: one timestep embedding per sample mapped once to six modulation vectors ("adaLN-single")
that each block adds to its own ``scale_shift_table``, and cross-attention from every frame's tokens to the
projected T5 caption in the spatial blocks only. Parameter names, shapes and the function computed are those
of diffusers' ``LatteTransformer3DModel`` (``latte.models.diffusers_io`` reads and writes its folders).

Caption mask: ``encoder_attention_mask`` (N, L), True / 1 = a real token, is a key mask of the cross-attention
(an exact -inf for padded keys). The original code adds a bias ``(1 - mask) * -10000`` instead; the two agree
to fp32 rounding whenever a caption has at least one real token. For a caption with none, the attention
output is exactly zero here (the cross-attention adds only its output bias and ignores the caption's values);
the bias form would average the padded tokens instead. Finite either way.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from latte.models.attention import MultiHeadAttention
from latte.models.embeddings import AdaLNSingle, CaptionProjection, SinCosPatchEmbed, sincos_temporal

ACTIVATIONS = {"gelu-approximate": "tanh", "gelu": "none"}  # diffusers' activation_fn -> nn.GELU(approximate)

# diffusers' LatteTransformer3DModel.__init__ arguments and defaults (for keys a config.json lacks).
DIFFUSERS_DEFAULTS: dict[str, object] = {
    "num_attention_heads": 16,
    "attention_head_dim": 88,
    "in_channels": None,
    "out_channels": None,
    "num_layers": 1,
    "dropout": 0.0,
    "cross_attention_dim": None,
    "attention_bias": False,
    "sample_size": 64,
    "patch_size": None,
    "activation_fn": "geglu",
    "num_embeds_ada_norm": None,
    "norm_type": "layer_norm",
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "caption_channels": None,
    "video_length": 16,
}


class GELUProjection(nn.Module):
    """Linear then GELU (``ff.net.0.proj`` in the checkpoints)."""

    def __init__(self, dim: int, hidden_dim: int, approximate: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate=approximate)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.proj(x))


class FeedForward(nn.Module):
    """``net``: GELU projection to 4D, dropout, linear back to D (diffusers' names)."""

    def __init__(self, dim: int, activation: str, dropout: float) -> None:
        super().__init__()
        hidden = 4 * dim
        self.net = nn.Sequential(
            GELUProjection(dim, hidden, ACTIVATIONS[activation]), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class T2VBlock(nn.Module):
    """Self-attention, [cross-attention to the caption,] MLP; adaLN-single modulation and gates.

    Works on x (N, S, L, D): S sequences of length L per sample (spatial: frames of tokens; temporal: token
    positions of frames). As in PixArt-alpha, the cross-attention has no norm, modulation or gate.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        cross_attention: bool,
        qkv_bias: bool,
        norm_eps: float,
        norm_affine: bool,
        activation: str,
        dropout: float,
        backend: str,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_affine)
        self.attn1 = MultiHeadAttention(dim, num_heads, qkv_bias=qkv_bias, dropout=dropout, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_affine)  # before the MLP
        self.attn2 = None
        if cross_attention:
            self.attn2 = MultiHeadAttention(
                dim, num_heads, context_dim=dim, qkv_bias=qkv_bias, dropout=dropout, backend=backend
            )
        self.ff = FeedForward(dim, activation, dropout)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self, x: Tensor, mod: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """x (N, S, L, D); mod (N, 6, D) from adaLN-single; context (N, Lc, D) projected caption, shared by
        the S sequences of a sample; context_mask (N, Lc) bool, True = real token."""
        n, s, length, d = x.shape
        mod = (self.scale_shift_table[None] + mod)[:, :, None, None]  # (N, 6, 1, 1, D), for every sequence
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)  # each (N, 1, 1, D)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        h = rearrange(h, "n s l d -> (n s) l d")  # (N*S, L, D): one attention sequence each
        x = x + gate_msa * rearrange(self.attn1(h), "(n s) l d -> n s l d", n=n)
        if self.attn2 is not None:
            # Every query of a sample sees the same caption keys, so all S*L of them attend in one sequence:
            # the same function as repeating the caption per frame, without computing its k/v S times.
            queries = rearrange(x, "n s l d -> n (s l) d")  # (N, S*L, D)
            x = x + rearrange(self.attn2(queries, context, context_mask), "n (s l) d -> n s l d", s=s)
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class LatteT2V(nn.Module):
    """Latte text-to-video diffusion transformer (Latte-1 / diffusers ``LatteTransformer3DModel``).

    Args (diffusers' config name in brackets; the defaults are Latte-1's):
        input_size: latent height = width the tables are built for [sample_size]; other sizes (multiples of
            the patch) run with a stretched table, as in diffusers.
        patch_size: spatial patch size p.
        in_channels, out_channels: latent channels in, predicted channels out (8 = eps + variance values).
        hidden_size, num_heads: width D and heads [num_attention_heads x attention_head_dim = D].
        num_layers: spatial-temporal PAIRS (Latte-1: 28, i.e. 56 blocks; ``Latte``'s ``depth`` counts blocks).
        caption_channels: width of the text encoder's states (T5-XXL: 4096).
        num_frames: frames the temporal table covers [video_length]; inputs may have fewer.
        qkv_bias: biases on q/k/v [attention_bias]. norm_eps, norm_affine: the blocks' LayerNorms
            [norm_eps, norm_elementwise_affine]. activation: the MLP's GELU [activation_fn].
        dropout: attention-output and MLP dropout.
        num_embeds_ada_norm: kept for the diffusers config only (adaLN-single has no embedding table).
        attention: attention backend, one of ``latte.models.attention.BACKENDS``.
        gradient_checkpointing: recompute each block in backward instead of storing its activations.

    The spatial table is built with PixArt's ``interpolation_scale = max(input_size // 64, 1)``, as diffusers
    derives it. Guidance is the sampler's business: there is no ``forward_with_cfg``.
    """

    # The sin-cos tables are non-persistent buffers, absent from the checkpoints (as in diffusers): no
    # parameter needs to be held fixed.
    FIXED_TABLES: tuple[str, ...] = ()

    def __init__(
        self,
        input_size: int = 64,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int = 8,
        hidden_size: int = 1152,
        num_layers: int = 28,
        num_heads: int = 16,
        caption_channels: int = 4096,
        num_frames: int = 16,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        norm_affine: bool = False,
        activation: str = "gelu-approximate",
        dropout: float = 0.0,
        num_embeds_ada_norm: int | None = 1000,
        attention: str = "auto",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the latent size {input_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by num_heads {num_heads}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported; choose one of {list(ACTIVATIONS)}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels, self.out_channels = in_channels, out_channels
        self.hidden_size, self.num_heads, self.num_layers = hidden_size, num_heads, num_layers
        self.caption_channels, self.num_frames = caption_channels, num_frames
        self.qkv_bias, self.norm_eps, self.norm_affine = qkv_bias, norm_eps, norm_affine
        self.activation, self.dropout, self.num_embeds_ada_norm = activation, dropout, num_embeds_ada_norm
        self.interpolation_scale = max(input_size // 64, 1)
        self.gradient_checkpointing = gradient_checkpointing

        self.pos_embed = SinCosPatchEmbed(
            input_size, patch_size, in_channels, hidden_size, self.interpolation_scale
        )
        self.adaln_single = AdaLNSingle(hidden_size)
        self.caption_projection = CaptionProjection(caption_channels, hidden_size)
        block = dict(
            dim=hidden_size,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            norm_eps=norm_eps,
            norm_affine=norm_affine,
            activation=activation,
            dropout=dropout,
            backend=attention,
        )
        self.transformer_blocks = nn.ModuleList(
            [T2VBlock(cross_attention=True, **block) for _ in range(num_layers)]
        )
        self.temporal_transformer_blocks = nn.ModuleList(
            [T2VBlock(cross_attention=False, **block) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        temporal = torch.from_numpy(sincos_temporal(hidden_size, num_frames)).float()  # (F_max, D)
        self.register_buffer("temp_pos_embed", temporal[None], persistent=False)  # (1, F_max, D)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt-alpha's initialisation: xavier linears (the patch conv as a linear map), N(0, 0.02) for the
        timestep and caption MLPs and adaLN-single, zeroed cross-attention outputs and output layer (the
        ``scale_shift_table``s keep their N(0, 1/D) draws)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        w = self.pos_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.pos_embed.proj.bias, 0)
        t_mlp = self.adaln_single.emb["timestep_embedder"]
        for linear in (t_mlp.linear_1, t_mlp.linear_2, self.adaln_single.linear):
            nn.init.normal_(linear.weight, std=0.02)
        for linear in (self.caption_projection.linear_1, self.caption_projection.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.constant_(block.attn2.to_out[0].weight, 0)
            nn.init.constant_(block.attn2.to_out[0].bias, 0)
        nn.init.constant_(self.proj_out.weight, 0)
        nn.init.constant_(self.proj_out.bias, 0)

    # ------------------------------------------------------------------------------------------------------
    # diffusers config (the file format lives in latte.models.diffusers_io)
    # ------------------------------------------------------------------------------------------------------

    def diffusers_config(self) -> dict[str, object]:
        """This model's ``LatteTransformer3DModel`` config (every init argument, no ``_class_name``)."""
        return {
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.hidden_size // self.num_heads,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
            "cross_attention_dim": self.hidden_size,
            "attention_bias": self.qkv_bias,
            "sample_size": self.input_size,
            "patch_size": self.patch_size,
            "activation_fn": self.activation,
            "num_embeds_ada_norm": self.num_embeds_ada_norm,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": self.norm_affine,
            "norm_eps": self.norm_eps,
            "caption_channels": self.caption_channels,
            "video_length": self.num_frames,
        }

    @staticmethod
    def kwargs_from_config(config: dict[str, object]) -> dict[str, object]:
        """Constructor arguments for a diffusers config (keys starting with ``_`` are metadata; absent keys
        take diffusers' defaults). One ValueError names every key or value this model cannot represent."""
        unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
        cfg = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in DIFFUSERS_DEFAULTS}}
        problems = [f"unknown key {k!r}" for k in unknown]
        for key in ("in_channels", "patch_size", "caption_channels"):
            if cfg[key] is None:
                problems.append(f"{key} is missing")
        if cfg["norm_type"] != "ada_norm_single":
            problems.append(f"norm_type {cfg['norm_type']!r} (only Latte-1's 'ada_norm_single' is supported)")
        if cfg["activation_fn"] not in ACTIVATIONS:
            problems.append(f"activation_fn {cfg['activation_fn']!r} (supported: {', '.join(ACTIVATIONS)})")
        width = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        if cfg["cross_attention_dim"] != width:
            problems.append(
                f"cross_attention_dim {cfg['cross_attention_dim']!r} must equal num_attention_heads x "
                f"attention_head_dim = {width} (the projected caption is that wide)"
            )
        if cfg["patch_size"] and cfg["sample_size"] % cfg["patch_size"]:
            problems.append(f"sample_size {cfg['sample_size']} is not a multiple of patch_size")
        if problems:
            raise ValueError("diffusers config not representable by LatteT2V: " + "; ".join(problems))
        return {
            "input_size": cfg["sample_size"],
            "patch_size": cfg["patch_size"],
            "in_channels": cfg["in_channels"],
            "out_channels": cfg["in_channels"] if cfg["out_channels"] is None else cfg["out_channels"],
            "hidden_size": width,
            "num_layers": cfg["num_layers"],
            "num_heads": cfg["num_attention_heads"],
            "caption_channels": cfg["caption_channels"],
            "num_frames": cfg["video_length"],
            "qkv_bias": cfg["attention_bias"],
            "norm_eps": cfg["norm_eps"],
            "norm_affine": cfg["norm_elementwise_affine"],
            "activation": cfg["activation_fn"],
            "dropout": cfg["dropout"],
            "num_embeds_ada_norm": cfg["num_embeds_ada_norm"],
        }

    @classmethod
    def from_config(cls, config: dict[str, object], **kwargs) -> LatteT2V:
        """A freshly initialised model for a diffusers config; ``kwargs``: attention, checkpointing."""
        return cls(**cls.kwargs_from_config(config), **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------

    def unpatchify(self, x: Tensor, gh: int, gw: int) -> Tensor:
        """(N, F, T, p*p*C_out) tokens -> (N, F, C_out, H, W) latents."""
        p = self.patch_size
        # Tokens row-major over the (h, w) grid of patches, each token's values (p, q, C) channel-last.
        return rearrange(x, "n f (h w) (p q c) -> n f c (h p) (w q)", h=gh, w=gw, p=p, q=p)

    def _run_block(self, block: nn.Module, x: Tensor, *args: Tensor | None) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def _check_inputs(self, x: Tensor, context: Tensor, mask: Tensor | None, temporal: bool) -> Tensor | None:
        """Validate shapes; the caption mask as (N, L) bool, True = real token."""
        if x.dim() != 5 or x.shape[2] != self.in_channels:
            raise ValueError(f"x must be (N, F, {self.in_channels}, H, W), got {tuple(x.shape)}")
        n, f, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        if temporal and f > self.num_frames:
            raise ValueError(f"input has {f} frames but the model's temporal table covers {self.num_frames}")
        if context.dim() != 3 or context.shape[0] != n or context.shape[2] != self.caption_channels:
            raise ValueError(
                f"encoder_hidden_states must be (N, L, {self.caption_channels}) with N = {n}, "
                f"got {tuple(context.shape)}"
            )
        if mask is None:
            return None
        if tuple(mask.shape) != (n, context.shape[1]):
            raise ValueError(
                f"encoder_attention_mask must be (N, L) = {(n, context.shape[1])}, bool or 0/1 with 1 = real "
                f"token (not the additive bias form), got {tuple(mask.shape)}"
            )
        return mask if mask.dtype == torch.bool else mask != 0

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        encoder_hidden_states: Tensor,
        encoder_attention_mask: Tensor | None = None,
        enable_temporal_attentions: bool = True,
        use_image_num: int = 0,
        sequence=None,
    ) -> Tensor:
        """Predict noise (and variance values) for noisy latents given a caption.

        x: (N, F, C, H, W) noisy latents (F <= num_frames when temporal attention runs); t: (N,) diffusion
        steps (or a scalar for all); encoder_hidden_states: (N, L, caption_channels) text-encoder states;
        encoder_attention_mask: (N, L) bool or 0/1, True = real token (cross-attention keys only);
        enable_temporal_attentions: False runs the spatial blocks only (image mode: every frame an image, no
        temporal table). Returns (N, F, C_out, H, W).

        Video-image joint training (``use_image_num`` K > 0, as the original latte_t2v.py): x holds F video
        frames then K images, (N, F+K, C, H, W); encoder_hidden_states (N, 1+K, L, caption_channels) and
        encoder_attention_mask (N, 1+K, L): the clip's caption, then each image's own. The images go through
        the spatial blocks (attending to their own caption) and the output layer, not the temporal blocks.

        sequence: sequence parallelism (``latte.parallel.sequence.SequenceShard``; None = off), as for
        ``Latte``: each rank of the group computes F/P frames in the spatial blocks (the caption replicated)
        and T/P token positions in the temporal blocks, and returns the whole output. With K images, rank r
        also takes images ``[r K/P, (r + 1) K/P)`` with their captions (K divisible by P).
        """
        if use_image_num:
            return self._forward_joint(
                x, t, encoder_hidden_states, encoder_attention_mask, use_image_num, sequence
            )
        temporal_on = enable_temporal_attentions
        mask = self._check_inputs(x, encoder_hidden_states, encoder_attention_mask, temporal_on)
        n, f, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        t = t.expand(n) if t.dim() == 0 else t
        all_frames = f  # what the temporal blocks see
        if sequence is not None:
            sequence.check(f, gh * gw)
            x = x[:, sequence.part(f)]  # (N, F/P, C, H, W): this rank's frames
            f = f // sequence.size
        frames = rearrange(x, "n f c h w -> (n f) c h w")  # (N*F, C, H, W)
        tokens = self.pos_embed(frames)  # (N*F, T, D), the spatial table added
        x = rearrange(tokens, "(n f) t d -> n f t d", n=n)  # (N, F, T, D)

        mod, embedded_t = self.adaln_single(t)  # (N, 6D), (N, D)
        mod = rearrange(mod, "n (six d) -> n six d", six=6)  # (N, 6, D): shift/scale/gate for attn and MLP
        context = self.caption_projection(encoder_hidden_states)  # (N, L, D)

        pairs = zip(self.transformer_blocks, self.temporal_transformer_blocks, strict=True)
        for i, (spatial, temporal) in enumerate(pairs):
            x = self._run_block(spatial, x, mod, context, mask)  # attends over T in each frame, then caption
            if not temporal_on:
                continue
            if sequence is not None:
                x = sequence.to_tokens(x)  # (N, F/P, T, D) -> (N, F, T/P, D): one all-to-all
            x = x.transpose(1, 2)  # (N, F, T, D) -> (N, T, F, D): frame sequences per token position
            if i == 0 and all_frames > 1:  # the temporal table, (1, 1, F, D), before the first temporal block
                x = x + self.temp_pos_embed[:, None, :all_frames].to(x.dtype)
            x = self._run_block(temporal, x, mod)  # attends over F
            x = x.transpose(1, 2)  # (N, T, F, D) -> (N, F, T, D)
            if sequence is not None:
                x = sequence.to_frames(x)  # (N, F, T/P, D) -> (N, F/P, T, D)

        shift, scale = (self.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)  # each (N, 1, D)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]  # per sample, (N, 1, 1, D) broadcast
        out = self.unpatchify(self.proj_out(x), gh, gw)  # (N, F, T, p*p*C_out) -> (N, F, C_out, H, W)
        return sequence.gather_frames(out) if sequence is not None else out  # SP: all F frames

    def _forward_joint(
        self, x: Tensor, t: Tensor, states: Tensor, mask: Tensor | None, k: int, sequence=None
    ) -> Tensor:
        """``forward`` with K images after the clip's frames (see there). The spatial blocks run on the video
        (N, F, T, D) with the clip's caption and on the images as N*K one-frame samples (N*K, 1, T, D) with
        their own captions: the same function as the original's per-frame batch (every frame's attention is
        its own sequence), computed in two calls. ``sequence``: this rank's F/P frames and K/P images (and
        the images' captions), the video switched to token positions around each temporal block."""
        n, frames, _, h, w = x.shape
        f = frames - k
        if not 0 < k < frames:
            raise ValueError(
                f"use_image_num {k} must be in [1, {frames}): x has {frames} frames, images last"
            )
        if states.dim() != 4 or tuple(states.shape[:2]) != (n, 1 + k):
            raise ValueError(
                f"with use_image_num {k}, encoder_hidden_states must be (N, 1+K, L, D) with (N, 1+K) = "
                f"{(n, 1 + k)}, "
                f"got {tuple(states.shape)}"
            )
        if mask is not None and tuple(mask.shape) != tuple(states.shape[:3]):
            raise ValueError(f"encoder_attention_mask must be (N, 1+K, L) = {tuple(states.shape[:3])}")
        mask = None if mask is None else (mask if mask.dtype == torch.bool else mask != 0)
        self._check_inputs(x[:, :f], states[:, 0], None if mask is None else mask[:, 0], True)
        gh, gw = h // self.patch_size, w // self.patch_size
        t = t.expand(n) if t.dim() == 0 else t
        all_frames = f  # what the temporal blocks see
        if sequence is not None:  # rank r: frames [r F/P, (r+1) F/P), images [r K/P, (r+1) K/P) + captions
            sequence.check(f, gh * gw, k)
            x = torch.cat([x[:, :f][:, sequence.part(f)], x[:, f:][:, sequence.part(k)]], dim=1)
            states = torch.cat([states[:, :1], states[:, 1:][:, sequence.part(k)]], dim=1)  # (N, 1+K/P, L, C)
            if mask is not None:
                mask = torch.cat([mask[:, :1], mask[:, 1:][:, sequence.part(k)]], dim=1)  # (N, 1+K/P, L)
            f, k = f // sequence.size, k // sequence.size
        tokens = self.pos_embed(rearrange(x, "n f c h w -> (n f) c h w"))  # (N*(F+K), T, D)
        tokens = rearrange(tokens, "(n f) t d -> n f t d", n=n)  # (N, F+K, T, D)
        video, images = tokens[:, :f], rearrange(tokens[:, f:], "n k t d -> (n k) 1 t d")  # (N*K, 1, T, D)

        mod, embedded_t = self.adaln_single(t)  # (N, 6D), (N, D)
        mod = rearrange(mod, "n (six d) -> n six d", six=6)  # (N, 6, D)
        mod_images = mod.repeat_interleave(k, dim=0)  # (N*K, 6, D): each image its sample's timestep
        context = self.caption_projection(states)  # (N, 1+K, L, D)
        video_context = context[:, 0]  # (N, L, D)
        image_context = rearrange(context[:, 1:], "n k l d -> (n k) l d")  # (N*K, L, D)
        video_mask = image_mask = None
        if mask is not None:
            video_mask, image_mask = mask[:, 0], rearrange(mask[:, 1:], "n k l -> (n k) l")

        pairs = zip(self.transformer_blocks, self.temporal_transformer_blocks, strict=True)
        for i, (spatial, temporal) in enumerate(pairs):
            video = self._run_block(spatial, video, mod, video_context, video_mask)
            images = self._run_block(spatial, images, mod_images, image_context, image_mask)
            if sequence is not None:
                video = sequence.to_tokens(video)  # (N, F/P, T, D) -> (N, F, T/P, D): one all-to-all
            video = video.transpose(1, 2)  # (N, F, T, D) -> (N, T, F, D)
            if i == 0 and all_frames > 1:
                video = video + self.temp_pos_embed[:, None, :all_frames].to(video.dtype)
            video = self._run_block(temporal, video, mod)  # attends over F; the images skip it
            video = video.transpose(1, 2)  # (N, T, F, D) -> (N, F, T, D)
            if sequence is not None:
                video = sequence.to_frames(video)  # (N, F, T/P, D) -> (N, F/P, T, D)

        x = torch.cat([video, rearrange(images, "(n k) 1 t d -> n k t d", n=n)], dim=1)  # (N, F+K, T, D)
        shift, scale = (self.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)  # each (N, 1, D)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        out = self.unpatchify(self.proj_out(x), gh, gw)  # (N, F+K, C_out, H, W); SP: F/P + K/P
        return out if sequence is None else sequence.gather_frames_then_images(out, k)  # (N, F+K, ...)
