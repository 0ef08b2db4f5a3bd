"""Latte: a latent diffusion transformer for video (Ma et al., 2024), as a pure nn.Module.

Spatial and temporal transformer blocks alternate (``blocks[0]`` spatial, ``blocks[1]`` temporal, ...): a
spatial block attends over the tokens of one frame, a temporal block over the frames at one token position.
Conditioning (timestep + class) enters every block and the final layer through adaLN-Zero.
The parameter names and the function computed are those of the released Latte checkpoints.

Video-image joint training (the original's ``models/latte_img.py``, same parameters and keys as the video
model): ``x`` holds F video frames followed by K = ``use_image_num`` single-frame image latents,
(N, F+K, C, H, W), and the model computes what the original's training-mode
``forward(x, t, y, y_image=..., use_image_num=K)`` computes:

* The spatial blocks and the final layer see all F+K frames, each frame with its own conditioning row: the
  timestep embedding plus, for class-conditional models, the clip's label embedding on the F video frames and
  each image's own label (``y_image`` (N, K), embedded by the same table) on the K images.
* The temporal blocks see only the F video frames: the temporal position table is added to the video frames
  alone (images get no temporal position), the K images pass every temporal block unchanged, and the
  temporal conditioning is the clip's (timestep + clip label) as in the video model.
* Label dropout in training (the model's own draw): the clip label is drawn as in the video model, and each
  sample's K image labels share one draw of their own (the original embeds ``y_image[n].reshape(1, K)`` per
  sample); ``force_drop_image_ids`` lets the caller draw it instead.
* Outputs and the loss cover all F+K frames. K = 0 is the video model, bit for bit: the same code.

Where ours is wider than the original: it takes images in eval mode too (the original's class-conditional
eval forward builds F rows of label conditioning against F+K of timestep, a shape error, so it only takes
images in training; ours uses the image labels as given, without dropout); it takes F <= ``num_frames``
(the original adds the whole temporal table, so F = ``num_frames``); and it needs no ``y_image`` for K = 0
(the original iterates it in training whatever K is). Sampling is video only (``forward_with_cfg``: K = 0).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from latte.models.attention import Attention
from latte.models.embeddings import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    sincos_2d,
    sincos_temporal,
)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (N, S, L, D) with per-sequence shift/scale (N, S, 1, D)."""
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, named as the checkpoints name it."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP with adaLN-Zero modulation and gates from the conditioning vector.

    Works on x of shape (N, S, L, D): N samples, S independent sequences per sample, each of length L.
    Spatial blocks see (N, F, T, D); temporal blocks see (N, T, F, D). Attention runs over L only.
    The modulation is computed for each of the N*S sequences from a conditioning vector per sequence, as the
    original model does, although it only depends on the sample: a matmul's rounding depends on its row
    count, and this keeps outputs bit-equal to the released model's (cost: ~2% of Latte-XL/2's FLOPs, mostly
    in temporal blocks).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, backend=backend)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (N, S, L, D); c (N*S, D), row n*S + s for sequence s of sample n; mask (N, S, L) bool (True =
        real token) or None."""
        n, s, length, d = x.shape
        mod = self.adaLN_modulation(c)  # (N*S, 6D)
        mod = mod.reshape(n, s, 1, 6 * d)  # (N, S, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_msa, scale_msa).reshape(n * s, length, d)  # (N*S, L, D)
        key_mask = None if mask is None else mask.reshape(n * s, length)  # (N*S, L)
        x = x + gate_msa * self.attn(h, key_mask).reshape(n, s, length, d)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from each token to its p*p*C_out patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (N, F, T, D); c (N*F, D), per frame as the original."""
        n, f = x.shape[:2]
        mod = self.adaLN_modulation(c)  # (N*F, 2D)
        shift, scale = mod.reshape(n, f, 1, -1).chunk(2, dim=-1)  # each (N, F, 1, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, F, T, p*p*C_out)


class Latte(nn.Module):
    """Latte video diffusion transformer.

    Args:
        input_size: latent height = width (image size / 8 for the SD VAE).
        patch_size: spatial patch size p (2 for the released models).
        in_channels: latent channels (4).
        hidden_size, depth, num_heads, mlp_ratio: transformer shape; ``depth`` counts spatial and temporal
            blocks together and must be even.
        num_frames: frames the temporal position table covers (inputs may have fewer).
        num_classes: 0 or None builds the unconditional model; otherwise a label embedder is added.
        learn_sigma: output 2*C channels (eps and the variance interpolation values).
        class_dropout_prob: label dropout in training (adds the "no class" row used by guidance).
        attention: attention backend, one of ``latte.models.attention.BACKENDS``.
        gradient_checkpointing: recompute each block in backward instead of storing its activations.
    """

    FIXED_TABLES = ("pos_embed", "temp_embed")  # sin-cos tables: frozen parameters, as checkpoints store them

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_frames: int = 16,
        class_dropout_prob: float = 0.1,
        num_classes: int | None = 1000,
        learn_sigma: bool = True,
        attention: str = "auto",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the latent size {input_size}")
        if depth % 2:
            raise ValueError(f"depth {depth} must be even: spatial and temporal blocks come in pairs")
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not divisible by num_heads {num_heads}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_heads = num_heads
        self.num_frames = num_frames
        self.num_classes = num_classes or 0
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if self.num_classes:
            self.y_embedder = LabelEmbedder(self.num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos tables, kept as frozen parameters because the checkpoints store them that way.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.temp_embed = nn.Parameter(torch.zeros(1, num_frames, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [TransformerBlock(hidden_size, num_heads, mlp_ratio, backend=attention) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT/Latte initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output layers."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        grid = self.x_embedder.grid_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.pos_embed.shape[-1], grid)).float()[None])
        temporal = sincos_temporal(self.temp_embed.shape[-1], self.num_frames)
        self.temp_embed.data.copy_(torch.from_numpy(temporal).float()[None])

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # the patch conv initialised as a linear map
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        if self.num_classes:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, F, T, p*p*C_out) tokens -> (N, F, C_out, H, W) latents."""
        p, g = self.patch_size, self.x_embedder.grid_size
        # Tokens row-major over the (h, w) grid of patches, each token's values (p, q, C) channel-last.
        return rearrange(x, "n f (h w) (p q c) -> n f c (h p) (w q)", h=g, p=p, q=p)  # (N, F, C, H, W)

    def _run_block(self, block: nn.Module, x: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, c, mask, use_reentrant=False)
        return block(x, c, mask)

    @staticmethod
    def _token_mask(attention_mask: Tensor, n: int, f: int, t: int) -> Tensor:
        """(N, F) frame mask or (N, F, T) token mask -> (N, F, T) bool, True = real."""
        if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) not in ((n, f), (n, f, t)):
            raise ValueError(
                f"attention_mask must be bool of shape (N, F) = {(n, f)} or (N, F, T) = {(n, f, t)}, "
                f"got {attention_mask.dtype} {tuple(attention_mask.shape)}"
            )
        token_mask = attention_mask if attention_mask.dim() == 3 else attention_mask[:, :, None]
        return token_mask.expand(n, f, t)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        y_image: Tensor | None = None,
        use_image_num: int = 0,
        attention_mask: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
        force_drop_image_ids: Tensor | None = None,
        sequence=None,
    ) -> Tensor:
        """Predict noise (and variance values) for noisy latents.

        x: (N, F+K, C, H, W) noisy latents, F <= num_frames video frames then K = ``use_image_num`` images
        (joint training, see the module docstring; K = 0: a plain clip); t: (N,) diffusion steps;
        y: (N,) class labels of the clips, y_image: (N, K) labels of the images (class-conditional models
        only; y_image only for K > 0); attention_mask: (N, F+K) bool, True = real frame (padded frames are
        ignored as keys by the temporal and spatial attention), or (N, F+K, T) per token; force_drop_ids: (N,)
        1 = replace the clip's label by the "no class" one, force_drop_image_ids: (N,) the same for all K
        image labels of a sample, or (N, K) per image (label dropout drawn by the caller, e.g. per global
        sample in training; without it a training-mode forward draws the dropout itself).
        sequence: sequence parallelism (``latte.parallel.sequence.SequenceShard``; None = off): every rank of
        the group passes the same inputs, computes its F/P frames (and K/P images) in the spatial blocks and
        its T/P token positions in the temporal blocks, and returns the whole output.
        Returns (N, F+K, C_out, H, W).
        """
        n, frames, ch, h, w = x.shape
        k = use_image_num
        f = frames - k  # video frames
        if not 0 <= k < frames:
            raise ValueError(
                f"use_image_num {k} must be in [0, {frames}): x has {frames} frames, images last"
            )
        if f > self.num_frames:
            raise ValueError(f"input has {f} frames but the model's temporal table covers {self.num_frames}")
        if (h, w) != (self.input_size, self.input_size) or ch != self.in_channels:
            raise ValueError(
                f"input latents are {ch}x{h}x{w}; the model expects {self.in_channels}x{self.input_size}²"
            )
        num_tokens = self.x_embedder.num_patches
        all_frames, all_images = f, k  # F and K; with SP below, f and k count this rank's share
        local: slice | Tensor = slice(None)  # the frames of x this rank computes: all, without SP
        if sequence is not None:  # rank r: video frames [r F/P, (r+1) F/P) and images [r K/P, (r+1) K/P)
            sequence.check(f, num_tokens, k)
            local = torch.cat([torch.arange(f)[sequence.part(f)], torch.arange(f, frames)[sequence.part(k)]])
            f, k = f // sequence.size, k // sequence.size
            frames = f + k
            x = x[:, local]  # (N, F/P + K/P, C, H, W): this rank's frames
        latents = rearrange(x, "n f c h w -> (n f) c h w")  # (N*(F+K), C, H, W)
        tokens = self.x_embedder(latents) + self.pos_embed  # (N*(F+K), T, D)
        x = rearrange(tokens, "(n f) t d -> n f t d", n=n)  # (N, F+K, T, D)
        temporal_tokens = num_tokens // (sequence.size if sequence is not None else 1)  # T/P with SP

        t_emb = self.t_embedder(t)  # (N, D)
        y_frames = y_tokens = None  # the label embedding of each frame, of each token position
        if self.num_classes:
            if y is None:
                raise ValueError("class-conditional Latte needs labels y")
            if (k or y_image is not None) and (y_image is None or tuple(y_image.shape) != (n, all_images)):
                got = None if y_image is None else tuple(y_image.shape)
                want = (n, all_images)
                raise ValueError(f"y_image must hold the labels of the images, (N, K) = {want}, got {got}")
            y_emb = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
            y_frames = repeat(y_emb, "n d -> n f d", f=f)  # (N, F, D): the clip's label on its frames
            if k:  # each image its own label, from the same table (with a dropout draw of its own)
                images = self.y_embedder(y_image, self.training, force_drop_image_ids)  # (N, K, D)
                if sequence is not None:
                    images = images[:, sequence.part(all_images)]  # (N, K/P, D): this rank's images
                y_frames = torch.cat([y_frames, images], dim=1)  # (N, F+K, D)
            y_tokens = repeat(y_emb, "n d -> n s d", s=temporal_tokens)  # (N, T, D)

        def per_sequence(labels: Tensor | None, s: int) -> Tensor:
            """(N, D) timestep and (N, S, D) label embeddings -> (N*S, D), row n*S + s: added once per pass
            and shared by the blocks, as the original does (its gradients then sum in the same order too)."""
            c = repeat(t_emb, "n d -> (n s) d", s=s)  # (N*S, D)
            return c if labels is None else c + rearrange(labels, "n s d -> (n s) d")

        c_spatial = per_sequence(y_frames, frames)  # (N*(F+K), D), the final layer's too
        c_temporal = per_sequence(y_tokens, temporal_tokens)  # (N*T, D): the clip's, images take no part

        spatial_mask = temporal_mask = None  # (the temporal blocks see all F frames)
        if attention_mask is not None:
            token_mask = self._token_mask(
                attention_mask, n, all_frames + all_images, num_tokens
            )  # (N, F+K, T)
            spatial_mask = token_mask[:, local]  # (N, F+K, T); SP: this rank's frames
            temporal_mask = token_mask[:, :all_frames].transpose(1, 2)  # (N, T, F)
            if sequence is not None:
                temporal_mask = temporal_mask[:, sequence.part(num_tokens)]  # (N, T/P, F)

        for i in range(0, len(self.blocks), 2):
            x = self._run_block(self.blocks[i], x, c_spatial, spatial_mask)  # attends over T in each frame
            video = x[:, :f]  # (N, F, T, D); SP: this rank's F/P frames
            if sequence is not None:
                video = sequence.to_tokens(video)  # (N, F/P, T, D) -> (N, F, T/P, D): one all-to-all
            video = video.transpose(1, 2)  # (N, F, T, D) -> (N, T, F, D): video frames per token position
            if i == 0:  # the temporal table, (1, 1, F, D), added once before the first temporal block
                video = video + self.temp_embed[:, None, :all_frames]
            video = self._run_block(self.blocks[i + 1], video, c_temporal, temporal_mask)  # attends over F
            video = video.transpose(1, 2)  # (N, T, F, D) -> (N, F, T, D)
            if sequence is not None:
                video = sequence.to_frames(video)  # (N, F, T/P, D) -> (N, F/P, T, D)
            x = torch.cat([video, x[:, f:]], dim=1) if k else video  # (N, F+K, T, D): images skip it

        x = self.final_layer(x, c_spatial)  # (N, F+K, T, p*p*C_out)
        out = self.unpatchify(x)  # (N, F+K, C_out, H, W)
        if sequence is None:
            return out
        return sequence.gather_frames_then_images(out, k)  # (N, F+K, C_out, H, W) on every rank

    def forward_with_cfg(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        cfg_scale: float,
        attention_mask: Tensor | None = None,
        sequence=None,
    ) -> Tensor:
        """Classifier-free guidance on a doubled batch [cond | uncond] (y's second half = the null class).

        As the reference does, guidance mixes only the eps channels; the variance channels pass through.
        Video only (no images, K = 0), as the original samples a joint-trained model.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)  # (N, F, C, H, W)
        out = self.forward(
            combined, t, y, attention_mask=attention_mask, sequence=sequence
        )  # (N, F, C_out, H, W)
        eps, rest = out[:, :, : self.in_channels], out[:, :, self.in_channels :]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=2)
